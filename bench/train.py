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
2. The frozen-feature cache (`vllama-jax encode`, ``data.features: cached``) at the same mid size, in the same run:
   a prepared WebVid-format dataset of generated clips and a model directory of the mid model (random weights);
   the encoding throughput of `encode_dataset` (frames/s: decoding, the ViT and the image Q-Former, writing) and
   the Trainer's step time on frames against the step on the cache, interleaved step by step (step time includes
   the input pipeline: decoding the clips in-process for the step on frames, reading the cache for the other).
3. Bytes per device from `train.py --dry-run` for VL stage 1 (global batch 256) and stage 2 (global batch 32) of
   LLaMA-2-7B and -13B, bf16, mesh fsdp=4 with 95 GiB per device: on 4 simulated CPU devices, and with
   --tpu-topology v5p:2x2x1 also compiled for a real v5p slice without TPUs (libtpu's compiler; the CPU backend
   upcasts bf16 matmul operands to fp32 and keeps those copies live, so its activation figures are pessimistic).

    python bench/train.py [--batch 4] [--frames 4] [--steps 3] [--peak-gflops G] [--no-torch] [--no-dry-run]
                          [--no-step] [--no-cache] [--tpu-topology v5p:2x2x1 [--no-cpu-dry-run]] [--only "stage 1"]
                          [--json PATH]
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
# the feature cache


def bench_cache(model_yaml: Path, tmp: Path, batch: int, frames: int, steps: int, clips: int) -> dict:
    """encode_dataset's throughput, then the Trainer's step on frames and on the cache, interleaved."""
    import numpy as np
    import yaml

    from vllama_jax.config import ModelConfig, from_dict
    from vllama_jax.data import synthetic
    from vllama_jax.models import init_params
    from vllama_jax.text import load_tokenizer
    from vllama_jax.train.config import train_config_from_dict
    from vllama_jax.train.encode import encode_dataset
    from vllama_jax.train.loop import Trainer
    from vllama_jax.weights.model_dir import save_model_dir

    mc = from_dict(ModelConfig, yaml.safe_load(model_yaml.read_text())).validate()
    save_model_dir(tmp / "model", mc, init_params(mc, seed=0), tokenizer=load_tokenizer(TOKENIZER))
    synthetic.make_prepared("webvid", tmp / "webvid", clips, make={"video": {"num_frames": 2 * frames,
                                                                              "width": 96, "height": 96}})
    data = tmp / "webvid" / "prepared"
    enc = encode_dataset(data, tmp / "model", num_frames=frames, sampling="uniform", dtype="bfloat16",
                         batch_size=batch, workers=2, progress=False, log=lambda s: None)
    trainers = {}
    for features in ("frames", "cached"):
        cfg = train_config_dict(model_yaml, tmp / f"out_{features}", batch, frames, 10**6)
        cfg["model"] = {"dir": str(tmp / "model"), "precision": "float32"}
        cfg["weights"] = {"trainable_from_model_dir": True}
        cfg["data"] = {"datasets": {"webvid": {"path": str(data), "sampling": "uniform"}}, "batch_size": batch,
                       "num_frames": frames, "max_txt_len": 32, "augment": False, "features": features}
        t = Trainer(train_config_from_dict(cfg), log_stream=open(os.devnull, "w"))
        t.run(1)  # compiles; its time is not counted
        trainers[features] = t
    times: dict[str, list[float]] = {k: [] for k in trainers}
    losses: dict[str, list[float]] = {k: [] for k in trainers}
    try:
        for _ in range(steps):
            for k, t in trainers.items():
                h = t.run(1)[0]
                times[k].append(h["step_time_s"])
                losses[k].append(h["loss"])
        flops = {k: next(iter(t._flops.values())) for k, t in trainers.items()}
    finally:
        for t in trainers.values():
            t.close()
    return {"encode_frames_per_s": enc.frames_per_s, "encode_frames": enc.frames, "encode_s": enc.seconds,
            "step_s": {k: float(np.median(v)) for k, v in times.items()}, "flops": flops,
            "losses": losses, "clips": clips}


# ----------------------------------------------------------------------------------------------------------------
# dry runs (child processes with 4 simulated devices)

DRY_RUNS = [  # (label, train config, --set overrides)
    ("LLaMA-2-7B  VL stage 1, batch 256", "configs/train_vl_stage1.yaml", []),
    ("LLaMA-2-7B  VL stage 1, batch 256, remat LLaMA", "configs/train_vl_stage1.yaml", ["model.remat_llama=true"]),
    ("LLaMA-2-7B  VL stage 1, batch 256, cached features", "configs/train_vl_stage1.yaml",
     ["data.features=cached"]),
    ("LLaMA-2-7B  VL stage 1, batch 256, scan layers", "configs/train_vl_stage1.yaml", ["model.scan_layers=true"]),
    ("LLaMA-2-7B  VL stage 1, batch 256, scan layers + remat", "configs/train_vl_stage1.yaml",
     ["model.scan_layers=true", "model.remat_llama=true"]),
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
    ap.add_argument("--no-cache", action="store_true", help="skip the feature-cache section")
    ap.add_argument("--clips", type=int, default=32, help="clips of the feature-cache section's dataset")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures here")
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

    load = os.getloadavg()
    report: dict = {"date": str(datetime.date.today()), "machine": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores", "jax": jax.__version__, "loadavg_start": load}
    print(f"# bench/train.py  {datetime.date.today()}  {report['machine']}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    mc = from_dict(ModelConfig, MID).validate()
    with tempfile.TemporaryDirectory() as tmp:
        model_yaml = Path(tmp) / "mid.yaml"
        model_yaml.write_text(yaml.safe_dump(MID))
        if not args.no_step:
            cfg = train_config_dict(model_yaml, Path(tmp) / "out", args.batch, args.frames, args.steps + 1)
            peak = matmul_peak_flops(4096, 3)
            jx = bench_jax(cfg, args.steps + 1)
            th = None if args.no_torch else bench_torch(cfg, mc, args.batch, args.frames, args.steps)
            print_step(mc, args, jx, th, peak)
            report["step"] = {"vllama_jax_s": jx["step_s"], "torch_s": th and th["step_s"], "flops": jx["flops"],
                              "matmul_peak_flops": peak}
        if not args.no_cache:
            c = bench_cache(model_yaml, Path(tmp), args.batch, args.frames, args.steps, args.clips)
            sf, sc = c["step_s"]["frames"], c["step_s"]["cached"]
            print(f"\nfeature cache, same mid model: encode {c['clips']} clips x {args.frames} frames "
                  f"(decode + ViT + image Q-Former + write, bf16) {c['encode_frames_per_s']:.1f} frames/s "
                  f"({c['encode_s']:.1f} s); step time median of {args.steps}, interleaved, incl. the input pipeline:")
            print(f"{'step':<44}{'s/step':>9}{'samples/s':>11}{'GFLOP':>9}")
            for name, k in (("on frames (towers every step)", "frames"), ("on cached features", "cached")):
                print(f"{name:<44}{c['step_s'][k]:>9.3f}{args.batch / c['step_s'][k]:>11.2f}"
                      f"{c['flops'][k] / 1e9:>9.1f}")
            print(f"cached step {sf / sc:.1f}x faster; XLA FLOPs per step {c['flops']['frames'] / c['flops']['cached']:.1f}x"
                  f" fewer; losses on frames {', '.join(f'{x:.4f}' for x in c['losses']['frames'])}, on the cache "
                  f"{', '.join(f'{x:.4f}' for x in c['losses']['cached'])}")
            report["cache"] = c
    if not args.no_dry_run:
        targets = [] if args.no_cpu_dry_run else [(None, "4 simulated CPU devices")]
        if args.tpu_topology:
            targets.append((args.tpu_topology, f"TPU {args.tpu_topology} compiled without TPUs (libtpu)"))
        report["dry_runs"] = []
        for topology, title in targets:
            rows = run_dry_runs(topology, tpu_library, args.only)
            print(f"\n--dry-run, bf16, {title}, mesh fsdp=4; GiB per device (of 95):")
            print(f"{'config':<52}{'kind':<17}{'trained':>8}{'AdamW':>7}{'frozen':>8}{'batch':>7}{'temp':>8}"
                  f"{'peak':>8}{'of 95':>7}{'TFLOP':>7}{'compile':>9}")
            for label, r in rows:
                print(f"{label:<52}{r['kind']:<17}{gib(r['trainable_params']):>8}{gib(r['optimizer_state']):>7}"
                      f"{gib(r['frozen_params']):>8}{gib(r['batch']):>7}{gib(r['activations_temp']):>8}"
                      f"{gib(r['peak_estimate']):>8}{100 * r['peak_estimate'] / (95 * 2**30):>6.0f}%"
                      f"{r['flops_per_device'] / 1e12:>7.1f}{r['compile_s']:>8.0f}s")
                report["dry_runs"].append({"label": label, "target": title, **r})
    report["loadavg_end"] = os.getloadavg()
    print(f"load average at the end {report['loadavg_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


def print_step(mc, args: argparse.Namespace, jx: dict, th: dict | None, peak: float) -> None:
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


if __name__ == "__main__":
    main()
