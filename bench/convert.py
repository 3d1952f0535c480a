"""Benchmark of `convert_weights.py` on a ~1B LLaMA: speed and peak memory.

    python bench/convert.py                       # TinyLlama-1.1B shapes, fp32 safetensors shards in /tmp
    python bench/convert.py --layers 4 --keep     # smaller / keep the generated files for another run

A random LLaMA with the shapes of TinyLlama-1.1B (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV heads,
vocab 32000) is written with numpy + safetensors as sharded safetensors (~1 GB shards) with an index and a
config.json. Each variant is converted in a fresh interpreter (so `ru_maxrss` is the conversion's own peak) and
reported: wall time, MB/s of the checkpoint read, peak RSS, RSS above the start (libraries imported, inputs
opened), and both divided by the largest tensor (the 32000x2048 embedding) and by the checkpoint size.

The shards are also copied file to file through a 16 MiB buffer in the same run (the peer: what the disk and page
cache give a program that reads and writes every byte once); "x plain copy" is the conversion's speed over it.

Measured 2026-12-05 11:28 UTC, `python bench/convert.py --keep --json convert.json`, this 2-core AMD EPYC machine
otherwise idle (load average 0.70 before, 1.18 after), TinyLlama-1.1B shapes, 4.40 GB fp32 in 5 shards, largest
tensor 262 MB, plain copy 9.3 s = 476 MB/s:

| variant                           | seconds | MB/s read | x plain copy | out GB | peak RSS GB | above start GB | above start / (largest + buffer) |
|-----------------------------------|---------|-----------|--------------|--------|-------------|----------------|----------------------------------|
| fp32 -> float32                   | 10.6    | 417       | 0.88         | 4.40   | 0.41        | 0.20           | 0.62                             |
| fp32 -> bfloat16                  | 9.5     | 465       | 0.98         | 2.20   | 0.56        | 0.35           | 1.08                             |
| fp32 -> float32 (no page release) | 10.0    | 438       | 0.92         | 4.40   | 4.75        | 4.54           | 13.78                            |

The code before (whole tensors: the safetensors package's copy of each tensor, a transposed copy, TensorStore's
zstd-encoded chunks resident) in the same minutes: 236 MB/s to float32 with 0.85 GB above the start (3.2x the
largest tensor), 308 MB/s to bfloat16 with 0.79 GB. "above start" is what the conversion itself adds to the
~0.2 GB of imported libraries: now the write buffer in flight, one chunk being transposed, and the input pages not
yet released. Without handing the input's mmap'ed pages back (`release_pages=False`) the whole checkpoint ends up
resident.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllama_jax.weights.model_dir import WRITE_BUFFER_BYTES  # noqa: E402


def generate(folder: Path, *, hidden: int, layers: int, inter: int, heads: int, kv_heads: int, vocab: int,
             shard_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write the random checkpoint; returns (total bytes, largest tensor bytes)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hd = hidden // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
                  (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                  (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                  (p + "post_attention_layernorm.weight", (hidden,))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # plan first; then one shard in memory at a time
    size = 0
    for name, shape in names:
        nbytes = int(np.prod(shape)) * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total, largest = {}, 0, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = (1.0 + w(*shape)) if len(shape) == 1 else w(*shape)
            weight_map[name] = fname
            total += tensors[name].nbytes
            largest = max(largest, tensors[name].nbytes)
        save_file(tensors, str(folder / fname))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32"}, indent=1))
    return total, largest


_CHILD = """
import json, sys
from vllama_jax.weights.convert import convert
rep = convert(sys.argv[1], files={"llama": sys.argv[2]}, dtype=sys.argv[3], no_tokenizer=True, progress=False,
              release_pages=sys.argv[4] == "1")
print(json.dumps(rep.to_json()))
"""


def run_variant(llama: Path, out: Path, dtype: str, release: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(llama), dtype, "1" if release else "0"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if res.returncode:
        sys.exit(f"conversion failed:\n{res.stderr[-3000:]}")
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    rep["wall_with_startup"] = wall
    rep["out_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return rep


def plain_copy(src: Path, dst: Path, block: int = 16 << 20) -> float:
    """Seconds to copy the checkpoint's shards file to file through a 16 MiB buffer (read + write in Python, no
    transform): the peer a conversion is measured against, on the same disk and page cache in the same run."""
    dst.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as r, open(dst / f.name, "wb") as w:
            while chunk := r.read(block):
                w.write(chunk)
    seconds = time.perf_counter() - t
    shutil.rmtree(dst, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vllama-bench-convert"))
    ap.add_argument("--shard-mb", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint (reused next time)")
    ap.add_argument("--variants", default="float32:release,bfloat16:release,float32:no-release",
                    help="comma list of OUT_DTYPE:release|no-release")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args()
    load_before = os.getloadavg()

    work = Path(args.workdir)
    llama = work / f"llama-{args.hidden}x{args.layers}"
    marker = llama / "bench.json"
    if marker.is_file():
        total, largest = json.loads(marker.read_text())
    else:
        t = time.perf_counter()
        total, largest = generate(llama, hidden=args.hidden, layers=args.layers, inter=args.intermediate, heads=32,
                                  kv_heads=4, vocab=args.vocab, shard_bytes=args.shard_mb << 20)
        marker.write_text(json.dumps([total, largest]))
        print(f"generated {llama} ({total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t:.0f} s")
    nshards = len(list(llama.glob("*.safetensors")))
    print(f"checkpoint: {total / 1e9:.2f} GB fp32 in {nshards} safetensors shards, largest tensor "
          f"{largest / 1e6:.0f} MB; {os.cpu_count()} CPUs")
    copy_s = plain_copy(llama, work / "copy")
    print(f"plain copy of the shards (read + write, 16 MiB buffer): {copy_s:.1f} s = {total / copy_s / 1e6:.0f} MB/s")
    bound = largest + WRITE_BUFFER_BYTES  # the unit of issue 19's memory target (at most 1.5x above the start)
    rows, figures = [], {}
    for v in args.variants.split(","):
        dtype, mode = v.split(":")
        rep = run_variant(llama, work / "out", dtype, mode == "release")
        peak, start = rep["peak_rss_bytes"], rep["start_rss_bytes"]
        figures[v] = {"seconds": rep["seconds"], "mb_per_s": total / rep["seconds"] / 1e6,
                      "out_gb": rep["out_bytes"] / 1e9, "peak_rss_gb": peak / 1e9, "start_rss_gb": start / 1e9,
                      "peak_over_largest": peak / largest, "above_start_over_largest": (peak - start) / largest,
                      "above_start_over_largest_plus_buffer": (peak - start) / bound,
                      "speed_of_plain_copy": copy_s / rep["seconds"]}
        rows.append((f"fp32 -> {dtype}" + ("" if mode == "release" else " (no page release)"),
                     f"{rep['seconds']:.1f}", f"{total / rep['seconds'] / 1e6:.0f}", f"{copy_s / rep['seconds']:.2f}",
                     f"{rep['out_bytes'] / 1e9:.2f}", f"{peak / 1e9:.2f}", f"{(peak - start) / 1e9:.2f}",
                     f"{(peak - start) / bound:.2f}", f"{peak / largest:.1f}", f"{peak / total:.3f}"))
    head = ("variant", "seconds", "MB/s read", "x plain copy", "out GB", "peak RSS GB", "above start GB",
            "above start / (largest + buffer)", "peak/largest", "peak/total")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    load_after = os.getloadavg()
    print(f"load average: {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "checkpoint_gb": total / 1e9, "largest_tensor_mb": largest / 1e6, "shards": nshards,
            "write_buffer_mb": WRITE_BUFFER_BYTES / 1e6, "plain_copy_s": copy_s, "plain_copy_mb_per_s": total / copy_s / 1e6,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after], "variants": figures}, indent=2) + "\n")
    shutil.rmtree(work / "out", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(llama, ignore_errors=True)


if __name__ == "__main__":
    main()
