"""Training step benchmark: vllama-jax's stage-1 step against the same step in plain PyTorch, and the `--dry-run`
memory of the released 7B / 13B configs on a simulated 4-device (v5p-8-like) mesh.

1. Step time, samples/s and MFU of the VL stage-1 training step (caption batch: frozen ViT -> image Q-Former ->
   frame positions -> trained video Q-Former (dropout 0.1) -> trained projection -> frozen LLaMA, token-mean loss,
   backward to the trained groups only, AdamW) at a mid size that a CPU can run: ViT 8 blocks x 512, full-width
   Q-Formers (image 12 layers, video 2 layers, 768), LLaMA 4 layers x 1024 (vocab 32000), random weights, fp32.
   The reference is the same step written plainly with transformers' Blip2VisionModel, Blip2QFormerModel and
   LlamaForCausalLM (frozen parts in eval mode without gradients, torch.optim.AdamW with upstream's two parameter
   groups on the trained parts). Throughput = XLA-counted FLOPs of the step / step time, shown against a measured
   fp32 matmul rate and (with --peak-gflops) the machine's theoretical peak (MFU).
2. Bytes per device from `train.py --dry-run` for VL stage 1 (global batch 256) and stage 2 (global batch 32) of
   LLaMA-2-7B and -13B, bf16, mesh fsdp=4 with 95 GiB per device: on 4 simulated CPU devices, and with
   --tpu-topology v5p:2x2x1 also compiled for a real v5p slice without TPUs (libtpu's compiler; the CPU backend
   upcasts bf16 matmul operands to fp32 and keeps those copies live, so its activation figures are pessimistic).

    python bench/train.py [--batch 4] [--frames 4] [--steps 3] [--peak-gflops G] [--no-torch] [--no-dry-run]
                          [--no-step] [--tpu-topology v5p:2x2x1 [--no-cpu-dry-run]] [--only "stage 1"]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "tiny_vl" / "llama"  # any LLaMA tokenizer works for captions

MID = {  # the mid-size model of section 1
    "name": "bench-mid", "equip_audio_branch": False, "template": "llama_2",
    "vit": {"image_size": 224, "patch_size": 14, "width": 512, "depth": 8, "num_heads": 8, "mlp_dim": 2048},
    "qformer": {"encoder_width": 512},
    "llama": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_layers": 4, "num_heads": 16,
              "num_kv_heads": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
}


def train_config_dict(model_yaml: Path, out: Path, batch: int, frames: int, steps: int) -> dict:
    return {
        "name": "bench_vl_stage1", "seed": 0, "mesh": "data=1", "max_steps": steps, "output_dir": str(out),
        "model": {"config": str(model_yaml), "precision": "float32"},
        "weights": {"random_frozen": True, "tokenizer": str(TOKENIZER)},
        "data": {"synthetic": {"num_examples": 64, "num_classes": 8}, "batch_size": batch, "num_frames": frames,
                 "max_txt_len": 32},
        "optim": {"init_lr": 1e-4, "min_lr": 8e-5, "warmup_lr": 1e-6, "warmup_steps": 2500, "iters_per_epoch": 2500,
                  "max_epoch": 5},
        "checkpoint": {"every": 10**6}, "log": {"every": 10**6, "peak_tflops": 1.0},
    }


def bench_jax(cfg_dict: dict, steps: int) -> dict:
    import numpy as np

    from vllama_jax.train.config import train_config_from_dict
    from vllama_jax.train.loop import Trainer

    trainer = Trainer(train_config_from_dict(cfg_dict), log_stream=open(os.devnull, "w"))
    try:
        t = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t
        hist = trainer.run()
        flops = next(iter(trainer._flops.values()))
    finally:
        trainer.close()
    times = [h["step_time_s"] for h in hist[1:]]  # step 1 overlaps the host-side start
    return {"step_s": float(np.median(times)), "flops": flops, "setup_s": setup_s,
            "losses": [h["loss"] for h in hist]}


def bench_torch(cfg_dict: dict, mc, batch: int, frames: int, steps: int) -> dict:
    """The same stage-1 step in plain PyTorch + transformers."""
    import numpy as np
    import torch
    from transformers import (
        Blip2QFormerConfig,
        Blip2QFormerModel,
        Blip2VisionConfig,
        Blip2VisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    v, q, vq, ll = mc.vit, mc.qformer, mc.video_qformer, mc.llama
    vision = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size)).eval()
    ln_vision = torch.nn.LayerNorm(v.width).eval()
    qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=v.width)).eval()
    query_tokens = torch.nn.Parameter(torch.randn(1, q.num_query_tokens, q.hidden_size) * 0.02, requires_grad=False)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=ll.vocab_size, hidden_size=ll.hidden_size, intermediate_size=ll.intermediate_size,
        num_hidden_layers=ll.num_layers, num_attention_heads=ll.num_heads, num_key_value_heads=ll.num_kv_heads,
        rms_norm_eps=ll.rms_norm_eps, max_position_embeddings=ll.max_position_embeddings)).eval()
    for m in (vision, ln_vision, qformer, llama):
        m.requires_grad_(False)
    # trained: video Q-Former (train mode: dropout 0.1), its query tokens, frame positions, projection
    video_qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=vq.hidden_size, num_hidden_layers=vq.num_layers, num_attention_heads=vq.num_heads,
        intermediate_size=vq.intermediate_size, cross_attention_frequency=1,
        encoder_hidden_size=vq.encoder_width)).train()
    video_tokens = torch.nn.Parameter(torch.randn(1, vq.num_query_tokens, vq.hidden_size) * 0.02)
    frame_pos = torch.nn.Embedding(mc.max_frame_pos, q.hidden_size)
    proj = torch.nn.Linear(vq.hidden_size, ll.hidden_size)
    named = [("video_query_tokens", video_tokens)]
    for prefix, mod in (("video_Qformer.", video_qformer), ("video_frame_position_embedding.", frame_pos),
                        ("llama_proj.", proj)):
        named += [(prefix + n, p) for n, p in mod.named_parameters()]
    no_decay = lambda n, p: p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n  # noqa: E731 - runner_base rule
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": 0.05},
                             {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-8)

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch * frames, 3, v.image_size, v.image_size)).astype(np.float32))
    text = torch.from_numpy(rng.integers(3, 500, size=(batch, cfg_dict["data"]["max_txt_len"])))
    nq = vq.num_query_tokens
    labels = torch.cat([torch.full((batch, 1 + nq), -100), text], dim=1)
    bos = torch.ones((batch, 1), dtype=torch.long)

    def step():
        with torch.no_grad():  # frozen towers: no graph
            img = ln_vision(vision(pixel_values=x).last_hidden_state)
            h = qformer(query_embeds=query_tokens.expand(batch * frames, -1, -1),
                        encoder_hidden_states=img).last_hidden_state
        h = h.reshape(batch, frames, nq, -1) + frame_pos(torch.arange(frames))[None, :, None]
        h = h.reshape(batch, frames * nq, -1)
        out = video_qformer(query_embeds=video_tokens.expand(batch, -1, -1), encoder_hidden_states=h).last_hidden_state
        emb = llama.get_input_embeddings()
        embeds = torch.cat([emb(bos), proj(out), emb(text)], dim=1)
        loss = llama(inputs_embeds=embeds, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"step_s": float(np.median(times))}


# ----------------------------------------------------------------------------------------------------------------
# dry runs (child processes with 4 simulated devices)

DRY_RUNS = [  # (label, train config, --set overrides)
    ("LLaMA-2-7B  VL stage 1, batch 256", "configs/train_vl_stage1.yaml", []),
    ("LLaMA-2-7B  VL stage 1, batch 256, remat LLaMA", "configs/train_vl_stage1.yaml", ["model.remat_llama=true"]),
    ("LLaMA-2-7B  VL stage 2, batch 32", "configs/train_vl_stage2.yaml", []),
    ("LLaMA-2-13B VL stage 1, batch 256", "configs/train_vl_stage1.yaml",
     ["model.config=configs/vl_llama2_13b_chat.yaml"]),
    ("LLaMA-2-13B VL stage 1, batch 256, remat LLaMA", "configs/train_vl_stage1.yaml",
     ["model.config=configs/vl_llama2_13b_chat.yaml", "model.remat_llama=true"]),
    ("LLaMA-2-13B VL stage 2, batch 32", "configs/train_vl_stage2.yaml",
     ["model.config=configs/vl_llama2_13b_chat.yaml"]),
]


def dry_run_child(topology: str, config: str, overrides: list[str]) -> None:
    from vllama_jax.train.config import load_train_config
    from vllama_jax.train.dry_run import tpu_topology_devices
    from vllama_jax.train.loop import Trainer

    devices = tpu_topology_devices(topology) if topology != "cpu" else None
    with tempfile.TemporaryDirectory() as out:
        cfg = load_train_config(ROOT / config, overrides + [f"output_dir={out}"])
        reports = Trainer(cfg, log_stream=open(os.devnull, "w"), devices=devices).dry_run(95)
    print("REPORT " + json.dumps(reports))


def run_dry_runs(topology: str | None, tpu_library: str | None, only: str | None = None) -> list[tuple[str, dict]]:
    """CPU: 4 simulated devices; with a TPU topology name: deviceless compilation for that slice (libtpu).
    ``only``: run the configs whose label contains this text."""
    rows = []
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    if topology:
        env.pop("JAX_PLATFORMS")
        if tpu_library:
            env["TPU_LIBRARY_PATH"] = tpu_library
    for label, config, overrides in DRY_RUNS:
        if only and only not in label:
            continue
        r = subprocess.run([sys.executable, __file__, "--dry-run-child", topology or "cpu", config, *overrides],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("REPORT ")), None)
        if r.returncode or line is None:
            print(f"{label}: dry run failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows += [(label, rep) for rep in json.loads(line[len("REPORT "):])]
        print(f"  ... {label}: done", file=sys.stderr, flush=True)
    return rows


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--peak-gflops", type=float, default=None,
                    help="theoretical fp32 peak of the machine for MFU (default: the measured matmul rate)")
    ap.add_argument("--no-dry-run", action="store_true")
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--tpu-topology", default=None, metavar="NAME",
                    help="also compile the dry runs for this TPU slice without TPUs, e.g. v5p:2x2x1 (needs libtpu; "
                         "slow: minutes per program)")
    ap.add_argument("--only", default=None, metavar="TEXT",
                    help="dry-run only the configs whose label contains TEXT, e.g. 'stage 1'")
    ap.add_argument("--no-cpu-dry-run", action="store_true", help="with --tpu-topology: skip the CPU dry runs")
    ap.add_argument("--dry-run-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run_child:
        dry_run_child(args.dry_run_child[0], args.dry_run_child[1], args.dry_run_child[2:])
        return
    # libtpu serves one process at a time: only the dry-run children compiling for a TPU topology may load it
    tpu_library = os.environ.pop("TPU_LIBRARY_PATH", None)
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import yaml

    from vllama_jax.config import ModelConfig, from_dict
    from vllama_jax.runtime import matmul_peak_flops

    print(f"# bench/train.py  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform})")
    if not args.no_step:
        mc = from_dict(ModelConfig, MID).validate()
        with tempfile.TemporaryDirectory() as tmp:
            model_yaml = Path(tmp) / "mid.yaml"
            model_yaml.write_text(yaml.safe_dump(MID))
            cfg = train_config_dict(model_yaml, Path(tmp) / "out", args.batch, args.frames, args.steps + 1)
            peak = matmul_peak_flops(4096, 3)
            jx = bench_jax(cfg, args.steps + 1)
            th = None if args.no_torch else bench_torch(cfg, mc, args.batch, args.frames, args.steps)
        v, ll = mc.vit, mc.llama
        print(f"VL stage-1 step, mid size: ViT {v.depth} x {v.width} ({v.image_size}px), image Q-Former "
              f"{mc.qformer.num_layers} x {mc.qformer.hidden_size}, video Q-Former {mc.video_qformer.num_layers} x "
              f"{mc.video_qformer.hidden_size}, LLaMA {ll.num_layers} x {ll.hidden_size} (vocab {ll.vocab_size}); "
              f"batch {args.batch} x {args.frames} frames, 32 caption tokens; fp32")
        theor = args.peak_gflops * 1e9 if args.peak_gflops else None
        print(f"step FLOPs (XLA cost analysis) {jx['flops'] / 1e9:.1f} GFLOP; fp32 4096^3 matmul measured "
              f"{peak / 1e9:.1f} GFLOP/s" + (f"; theoretical peak {theor / 1e9:.0f} GFLOP/s" if theor else "")
              + f"; median of {args.steps} steps after a warm-up step")
        print(f"{'implementation':<44}{'s/step':>9}{'samples/s':>11}{'GFLOP/s':>9}{'of matmul':>11}"
              + (f"{'MFU':>7}" if theor else ""))
        rows = [("vllama-jax (jit, AdamW, dropout)", jx["step_s"])]
        if th is not None:
            rows.append(("PyTorch + transformers (eager, AdamW)", th["step_s"]))
        for name, t in rows:
            rate = jx["flops"] / t
            print(f"{name:<44}{t:>9.2f}{args.batch / t:>11.2f}{rate / 1e9:>9.1f}{100 * rate / peak:>10.0f}%"
                  + (f"{100 * rate / theor:>6.0f}%" if theor else ""))
        print(f"(vllama-jax set-up incl. random frozen init: {jx['setup_s']:.1f} s; losses "
              f"{', '.join(f'{x:.3f}' for x in jx['losses'])})")
    if not args.no_dry_run:
        targets = [] if args.no_cpu_dry_run else [(None, "4 simulated CPU devices")]
        if args.tpu_topology:
            targets.append((args.tpu_topology, f"TPU {args.tpu_topology} compiled without TPUs (libtpu)"))
        for topology, title in targets:
            rows = run_dry_runs(topology, tpu_library, args.only)
            print(f"\n--dry-run, bf16, {title}, mesh fsdp=4; GiB per device (of 95):")
            print(f"{'config':<48}{'kind':<13}{'trained':>8}{'AdamW':>7}{'frozen':>8}{'batch':>7}{'temp':>8}"
                  f"{'peak':>8}{'of 95':>7}{'TFLOP':>7}{'compile':>9}")
            for label, r in rows:
                print(f"{label:<48}{r['kind']:<13}{gib(r['trainable_params']):>8}{gib(r['optimizer_state']):>7}"
                      f"{gib(r['frozen_params']):>8}{gib(r['batch']):>7}{gib(r['activations_temp']):>8}"
                      f"{gib(r['peak_estimate']):>8}{100 * r['peak_estimate'] / (95 * 2**30):>6.0f}%"
                      f"{r['flops_per_device'] / 1e12:>7.1f}{r['compile_s']:>8.0f}s")


if __name__ == "__main__":
    main()
