"""Conversion streams: its memory follows the largest tensor, not the model (README "Install": "peak memory a few
times the largest tensor, not the model"; vllama_jax/weights/convert.py, step 3).

A LLaMA-shaped safetensors folder (~207 MiB, one clearly largest tensor: the 62.5 MiB embedding table) is written
here and converted by `vllama-jax convert` in a CHILD process, whose own report gives its resident-set peak and its
resident set after the imports (`peak_rss_bytes`, `start_rss_bytes`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from vllama_jax.weights.readers import SafetensorsSource

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
WRITE_BUFFER = 64 * MiB  # vllama_jax.weights.model_dir.WRITE_BUFFER_BYTES, the default in flight
# Resident memory the conversion may add over the child's post-import baseline, in units of (largest tensor +
# write buffer): issue 19's bound. Measured on this project's 2-core CPU with the checkpoint below: 0.95 since the
# reader maps tensors instead of copying them and the writer streams large ones chunk by chunk, uncompressed
# (1.50-1.59 before); a converter that keeps every tensor it read (views of the mapped file) measured 2.65.
FACTOR = 1.5

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 32000, 512, 1376, 12


def _write_checkpoint(folder: Path) -> tuple[int, int]:
    """A HF LLaMA folder (config.json + one model.safetensors, tied embeddings). Returns (total bytes, largest)."""
    folder.mkdir(parents=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN,
               intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=8,
               num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.random((rows, cols), dtype=np.float32) - 0.5

    tensors = {"model.embed_tokens.weight": mat(VOCAB, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            tensors[f"{p}self_attn.{n}_proj.weight"] = mat(HIDDEN, HIDDEN)
        tensors[p + "mlp.gate_proj.weight"] = mat(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.up_proj.weight"] = mat(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.down_proj.weight"] = mat(HIDDEN, INTERMEDIATE)
        tensors[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    sizes = sorted(t.nbytes for t in tensors.values())
    return sum(sizes), sizes[-1]


def test_safetensors_tensors_are_views_of_the_mapped_file(tmp_path):
    """No copy on reading: a tensor is a read-only view of the file's mapping (bf16 too, without torch)."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    bf = a.astype(ml_dtypes.bfloat16)
    save_file({"a": a, "empty": np.zeros((0, 4), np.float16)}, str(tmp_path / "x.safetensors"))
    src = SafetensorsSource(tmp_path / "x.safetensors")
    got = src.get("a")
    np.testing.assert_array_equal(got, a)
    assert got.base is not None and not got.flags.writeable and not got.flags.owndata
    assert src.get("empty").shape == (0, 4)
    save_torch_file({"b": torch.from_numpy(a).to(torch.bfloat16)}, str(tmp_path / "b.safetensors"))
    got = SafetensorsSource(tmp_path / "b.safetensors").get("b")
    assert got.dtype == bf.dtype and not got.flags.owndata
    np.testing.assert_array_equal(got, bf)


@pytest.mark.slow
def test_conversion_memory_follows_the_largest_tensor(tmp_path):
    total, largest = _write_checkpoint(tmp_path / "llama")
    assert largest == VOCAB * HIDDEN * 4 and total > 3 * largest  # one clearly largest tensor, most bytes elsewhere
    report = tmp_path / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    res = subprocess.run([sys.executable, "-m", "vllama_jax.cli", "convert", "--llama", str(tmp_path / "llama"),
                          "--out", str(tmp_path / "model"), "--no-tokenizer", "--quiet", "--report-json",
                          str(report)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["largest_tensor_bytes"] == largest  # the report measured what was converted
    added = r["peak_rss_bytes"] - r["start_rss_bytes"]
    bound = FACTOR * (largest + WRITE_BUFFER)
    print(f"checkpoint {total / MiB:.0f} MiB, largest tensor {largest / MiB:.1f} MiB: peak RSS {r['peak_rss_bytes'] / MiB:.0f}"
          f" MiB, {added / MiB:.0f} MiB above the post-import baseline = {added / (largest + WRITE_BUFFER):.2f} x "
          f"(largest + write buffer); bound {FACTOR} x")
    assert 0 < added <= bound, (
        f"conversion added {added / MiB:.0f} MiB of resident memory, more than {FACTOR} x (largest tensor "
        f"{largest / MiB:.1f} MiB + write buffer {WRITE_BUFFER / MiB:.0f} MiB) = {bound / MiB:.0f} MiB "
        f"(checkpoint {total / MiB:.0f} MiB)")
