"""Frames per second of the video path at its real size, against the PyTorch reference, in one run.

The video path: EVA ViT-g/14 (224x224, 39 blocks) -> ln_vision -> BLIP-2 image Q-Former (12 layers) -> frame
positions -> video Q-Former (2 layers) -> projection, for one clip of N frames. The reference is transformers'
`Blip2VisionModel` + `Blip2QFormerModel` at the same sizes (random weights). Also prints the achieved GFLOP/s
against this machine's measured float32 matmul peak.

    python bench/encoders.py [--frames 8] [--repeats 2] [--small]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import numpy as np

from vllama_jax.runtime import matmul_peak_flops


def vit_flops(width: int, depth: int, mlp: int, tokens: int, patch: int) -> float:
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    stem = 2 * (tokens - 1) * (3 * patch * patch) * width
    return depth * per_layer + stem


def qformer_flops(hidden: int, layers: int, inter: int, queries: int, memory: int, enc: int, freq: int) -> float:
    total = 0.0
    for i in range(layers):
        total += 2 * queries * 4 * hidden * hidden + 2 * 2 * queries * queries * hidden  # self-attention
        if i % freq == 0:
            total += 2 * queries * 2 * hidden * hidden + 2 * memory * 2 * enc * hidden  # q, out; k, v
            total += 2 * 2 * queries * memory * hidden
        total += 2 * queries * 2 * hidden * inter
    return total


def bench_jax(cfg, frames: np.ndarray, repeats: int) -> tuple[float, float]:
    from vllama_jax.models import build_model, init_params

    model = build_model(cfg)
    params = init_params(cfg)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_video))
    t = time.perf_counter()
    fn(params, frames).block_until_ready()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(params, frames).block_until_ready()
        times.append(time.perf_counter() - t)
    return first, min(times)


def bench_torch(cfg, frames: np.ndarray, repeats: int) -> float:
    import torch
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

    v, q, vq = cfg.vit, cfg.qformer, cfg.video_qformer
    vision = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size)).eval()
    qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=v.width)).eval()
    video_qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=vq.hidden_size, num_hidden_layers=vq.num_layers, num_attention_heads=vq.num_heads,
        intermediate_size=vq.intermediate_size, cross_attention_frequency=1, encoder_hidden_size=vq.encoder_width)).eval()
    query_tokens = torch.zeros(1, q.num_query_tokens, q.hidden_size)
    video_tokens = torch.zeros(1, vq.num_query_tokens, vq.hidden_size)
    pos = torch.nn.Embedding(cfg.max_frame_pos, q.hidden_size)
    proj = torch.nn.Linear(vq.hidden_size, cfg.llama.hidden_size)
    x = torch.from_numpy(frames[0].transpose(0, 3, 1, 2).copy())
    t_frames = x.shape[0]

    def run():
        with torch.inference_mode():
            img = vision(pixel_values=x).last_hidden_state
            h = qformer(query_embeds=query_tokens.expand(t_frames, -1, -1), encoder_hidden_states=img).last_hidden_state
            h = h + pos(torch.arange(t_frames))[:, None]
            h = h.reshape(1, -1, h.shape[-1])
            out = video_qformer(query_embeds=video_tokens, encoder_hidden_states=h).last_hidden_state
            return proj(out)

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a reduced ViT (8 blocks) for a quick check")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    from vllama_jax.config import LlamaConfig, ModelConfig, ViTConfig

    # the LLM is not on the video path; a 1-layer stand-in keeps the projection's 4096-wide output
    llama = LlamaConfig(num_layers=1, vocab_size=256, intermediate_size=256)
    cfg = ModelConfig(equip_audio_branch=False, llama=llama, vit=ViTConfig(depth=8) if args.small else ViTConfig())
    cfg.validate()
    frames = np.random.default_rng(0).normal(size=(1, args.frames, 224, 224, 3)).astype(np.float32)
    v, q, vq = cfg.vit, cfg.qformer, cfg.video_qformer
    tokens = v.num_patches + 1
    flops = args.frames * (vit_flops(v.width, v.depth, v.mlp_dim, tokens, v.patch_size)
                           + qformer_flops(q.hidden_size, q.num_layers, q.intermediate_size, q.num_query_tokens,
                                           tokens, v.width, q.cross_attention_freq))
    flops += qformer_flops(vq.hidden_size, vq.num_layers, vq.intermediate_size, vq.num_query_tokens,
                           args.frames * q.num_query_tokens, vq.encoder_width, 1)

    peak = matmul_peak_flops() / 1e9
    first, jax_t = bench_jax(cfg, frames, args.repeats)
    torch_t = None if args.no_torch else bench_torch(cfg, frames, args.repeats)

    print(f"# bench/encoders.py  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform})")
    print(f"video path: ViT {v.depth} blocks x {v.width}, {args.frames} frames of 224x224, "
          f"{flops / 1e9:.1f} GFLOP per clip; float32 matmul peak measured {peak:.1f} GFLOP/s")
    print(f"{'implementation':<34}{'s/clip':>10}{'frames/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    rows = [("vllama-jax (jit, float32)", jax_t)]
    if torch_t is not None:
        rows.append(("PyTorch transformers (float32)", torch_t))
    for name, t in rows:
        gf = flops / t / 1e9
        print(f"{name:<34}{t:>10.2f}{args.frames / t:>10.2f}{gf:>10.1f}{100 * gf / peak:>7.0f}%")
    print(f"(vllama-jax first call incl. compilation: {first:.1f} s)")


if __name__ == "__main__":
    main()
