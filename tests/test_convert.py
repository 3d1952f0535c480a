"""`convert_weights.py`: upstream files -> model directory -> the fixture outputs, the way back to .pth, LLMs from
transformers folders and GGUF, sharded restore, and clean failures (one line, nothing left behind)."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers import SMOLLM2_LOGIT_ATOL, TINY_CONFIG, assert_close
from vllama_jax.config import load_model_config
from vllama_jax.models import abstract_params, build_model
from vllama_jax.sharding import logical_to_mesh_spec, make_mesh
from vllama_jax.cli import main as cli_main
from vllama_jax.weights import convert as convert_mod
from vllama_jax.weights import detect as detect_mod
from vllama_jax.weights import infer_config as infer_mod
from vllama_jax.weights import model_dir as model_dir_mod
from vllama_jax.tree import flatten_params
from vllama_jax.weights.keymaps import CHECKPOINT_BUFFERS
from vllama_jax.weights.model_dir import load_model_dir

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "convert_weights.py"
PLACEHOLDER = 512
# heads are invisible in the shapes: what a user converting the tiny model without --config must say
TINY_HEADS = ["vit.num_heads=4", "qformer.num_heads=4", "video_qformer.num_heads=4", "audio_qformer.num_heads=4",
              "imagebind_audio.num_heads=4", "imagebind_vision.num_heads=2", "template=vicuna"]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_failure(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1, res.stderr
    assert err[0].startswith("error: ") and "Traceback" not in res.stderr
    for n in needles:
        assert n in err[0], err[0]


def leftovers(parent: Path, keep: set[str] = frozenset()) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory) -> Path:
    """The fixture release folder converted by the CLI (auto-detection + the tiny preset)."""
    out = tmp_path_factory.mktemp("conv") / "tiny-model"
    res = run_cli(tiny_dir, "--config", "tiny_test", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "total" in res.stdout and "peak RSS" in res.stdout
    return out


# ------------------------------------------------------------------------------------------------------------
# 1. fixture release -> model directory -> fixture outputs


@pytest.mark.slow
def test_cli_conversion_reproduces_fixture_outputs(converted, tiny_model, tiny_inputs, tiny_outputs):
    _, reference_params = tiny_model  # the same files through the library loader
    m = load_model_dir(converted)
    assert m.config == load_model_config(TINY_CONFIG)
    assert set(m.groups) == set(reference_params)
    ours, ref = flatten_params(m.params), flatten_params(reference_params)
    assert set(ours) == set(ref)
    for k in ref:  # bit-exact: conversion is a pure re-layout
        np.testing.assert_array_equal(np.asarray(ours[k]), ref[k], err_msg=k)
    assert m.tokenizer is not None and m.tokenizer.image_placeholder_id == PLACEHOLDER
    assert m.manifest["components"]["llama"]["source"].endswith("llama")

    model, params = build_model(m.config), m.params
    inputs, out = tiny_inputs, tiny_outputs
    frames = jnp.asarray(inputs["video"].transpose(0, 2, 3, 4, 1))

    def run(method, *a, **kw):
        return jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=getattr(model, method), **kw))(params, *a)

    assert_close(run("encode_audio", jnp.asarray(inputs["audio"])), out["audio.inputs_llama"],
                 name="audio.inputs_llama")
    # one compiled path for the vision branch + LLM: the spliced inputs hold video.inputs_llama at the placeholders
    ids = inputs["stage2_vicuna.input_ids"]
    res = run("instruction_loss", frames, input_ids=ids, labels=inputs["stage2_vicuna.labels"],
              attention_mask=inputs["stage2_vicuna.attention_mask"], placeholder_id=PLACEHOLDER)
    video = np.asarray(res["inputs_embeds"])[ids == PLACEHOLDER].reshape(out["video.inputs_llama"].shape)
    assert_close(video, out["video.inputs_llama"], name="video.inputs_llama")
    assert_close(res["inputs_embeds"], out["stage2_vicuna.inputs_embeds"], name="stage2_vicuna.inputs_embeds")
    assert_close(res["logits"], out["stage2_vicuna.logits"], name="stage2_vicuna.logits")
    assert abs(float(res["loss"]) - float(out["stage2_vicuna.loss"])) < 1e-5


def test_config_inferred_from_the_files_equals_the_preset(tiny_dir):
    """Without --config, every shape-decided value is read from the files (heads/template via --set)."""
    cache: dict = {}
    files, notes = detect_mod.detect_inputs(tiny_dir, cache)
    assert {k: p.name for k, p in files.items()} == {
        "eva_vit": "eva_vit.pth", "blip2": "blip2_qformer.pth", "imagebind": "imagebind.pth", "llama": "llama",
        "vl_ckpt": "vl_ckpt.pth", "al_ckpt": "al_ckpt.pth"}
    sources = {k: detect_mod.open_input(k, p, cache) for k, p in files.items()}
    cfg = infer_mod.infer_config(sources, llama_path=files["llama"], overrides=TINY_HEADS, name="tiny-test")
    assert cfg == load_model_config(TINY_CONFIG)
    # the heads really are required when the widths are not the released ones
    with pytest.raises(detect_mod.ConvertError, match=r"vit\.num_heads: not visible in the weights"):
        infer_mod.infer_config(sources, llama_path=files["llama"])


@pytest.mark.slow
def test_llm_only_conversion_infers_everything(tiny_dir, tmp_path):
    rep = convert_mod.convert(tmp_path / "llm", files={"llama": tiny_dir / "llama"}, progress=False)
    assert [c.name for c in rep.components] == ["llama"] and rep.components[0].params == 147_776
    assert not rep.config.equip_audio_branch and rep.config.llama.hidden_size == 64
    assert "visual_encoder" in rep.absent_groups and "llama" not in rep.absent_groups
    m = load_model_dir(tmp_path / "llm")
    assert m.groups == ("llama",) and m.tokenizer is not None


@pytest.mark.slow
def test_config_records_the_compute_dtype_asked_for(tiny_dir, tmp_path):
    """`--dtype bfloat16` without --config: config.yaml has the ViT and the LLaMA computing in bf16 (not float32
    over bf16 weights); a per-tower choice wins; no choice keeps the config's precision (the preset's)."""
    llm = tiny_dir / "llama"
    heads = [a for h in TINY_HEADS for a in ("--set", h)]
    res = run_cli(tiny_dir, *heads, "--dtype", "bfloat16", "--out", tmp_path / "bf16", "--quiet")
    assert res.returncode == 0, res.stderr
    p = load_model_config(tmp_path / "bf16" / "config.yaml").precision
    assert (p.vit, p.llama, p.vit_params, p.llama_params) == ("bfloat16",) * 4
    assert p.qformer == p.imagebind == "float32"  # the Q-Formers compute in float32, as in the released presets
    assert load_model_dir(tmp_path / "bf16").params["llama"]["norm"]["scale"].dtype == jnp.bfloat16

    rep = convert_mod.convert(tmp_path / "mixed", files={"llama": llm}, dtype="bfloat16",
                              dtypes={"llama": "float16"}, progress=False)
    assert (rep.config.precision.llama, rep.config.precision.llama_params) == ("float16", "float16")
    preset = load_model_config(ROOT / "configs" / "vl_llama2_7b_chat.yaml").precision
    base = dataclasses.replace(load_model_config(TINY_CONFIG), precision=preset)
    kept = convert_mod.converted_precision(base, None, {})
    assert kept == preset  # vit float16, llama bfloat16: the released preset's, untouched
    assert convert_mod.converted_precision(base, "float32", {}) == dataclasses.replace(
        preset, vit="float32", llama="float32", vit_params="float32", llama_params="float32")


@pytest.mark.parametrize("with_torch", [True, False])
def test_fast_transpose_and_cast_equal_numpy(with_torch, monkeypatch):
    """The conversion's transpose and cast (torch's blocked copy, or row blocks without torch) give numpy's bits."""
    import ml_dtypes

    from vllama_jax.weights import arrays

    monkeypatch.setattr(arrays, "_torch", torch if with_torch else False)
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float16, ml_dtypes.bfloat16, np.int8):
        a = (rng.standard_normal((700, 300)) * 100).astype(dt)
        t = arrays.transpose(a)
        assert t.flags.c_contiguous and t.dtype == a.dtype and np.array_equal(t, a.T)
        for to in (np.float32, np.float16, ml_dtypes.bfloat16):
            c = arrays.cast(a, to)
            assert c.flags.c_contiguous and c.dtype == to
            np.testing.assert_array_equal(c.view(np.uint8), a.astype(to).view(np.uint8), err_msg=f"{dt} -> {to}")
    assert arrays.cast(t, t.dtype) is t  # already right: no copy


@pytest.mark.slow
def test_init_missing_fills_trainable_groups(tiny_dir, tmp_path):
    out = tmp_path / "scratch"
    rep = convert_mod.convert(out, files={"llama": tiny_dir / "llama", "eva_vit": tiny_dir / "eva_vit.pth",
                                          "blip2": tiny_dir / "blip2_qformer.pth"},
                              config="tiny_test", overrides=["equip_audio_branch=false"], init_missing=True,
                              progress=False)
    assert rep.components[-1].name == "init"
    m = load_model_dir(out)
    assert set(m.groups) == {"llama", "visual_encoder", "qformer", "query_tokens", "ln_vision", "video_qformer",
                             "video_query_tokens", "video_frame_position_embedding", "llama_proj"}
    emb = np.asarray(m.params["video_frame_position_embedding"]["embedding"])
    assert emb.shape == (8, 32) and 0.5 < emb.std() < 2.0  # nn.Embedding's N(0, 1), as upstream


# ------------------------------------------------------------------------------------------------------------
# 2. round trip: upstream .pth -> model directory -> exported .pth


def _parameters_of(path: Path) -> dict[str, torch.Tensor]:
    import re

    return {k: v for k, v in torch.load(path, weights_only=True)["model"].items()
            if not any(re.match(b, k) for b in CHECKPOINT_BUFFERS)}


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32 and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


@pytest.mark.slow
def test_export_round_trip_is_key_for_key(converted, tiny_dir, tmp_path):
    """vl_ckpt.pth + al_ckpt.pth -> model dir -> `convert_weights.py export`: the same parameters, key for key."""
    out = tmp_path / "both.pth"
    res = run_cli("export", "--model", converted, "--out", out)
    assert res.returncode == 0, res.stderr
    want = {**_parameters_of(tiny_dir / "vl_ckpt.pth"), **_parameters_of(tiny_dir / "al_ckpt.pth")}
    _assert_same_tensors(torch.load(out, weights_only=True)["model"], want)


@pytest.mark.slow
@pytest.mark.parametrize("branch,ref", [("video", "vl_ckpt.pth"), ("audio", "al_ckpt.pth")])
def test_export_one_branch(converted, tiny_dir, tmp_path, branch, ref):
    from vllama_jax.weights.export import ExportError, export_checkpoint

    rep = export_checkpoint(converted, tmp_path / "x.pth", branch=branch)
    assert rep.branches == [branch]
    _assert_same_tensors(torch.load(tmp_path / "x.pth", weights_only=True)["model"], _parameters_of(tiny_dir / ref))
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(converted, tmp_path / "x.pth", branch=branch)


# ------------------------------------------------------------------------------------------------------------
# 3. LLMs: a transformers-written sharded folder and the SmolLM2 GGUF


def _llama_logits(m, ids):
    from vllama_jax.models.llama import Llama

    llama = Llama(m.config.llama)
    p = m.params["llama"]
    return np.asarray(jax.jit(lambda p, i: llama.apply({"params": p}, llama.apply({"params": p}, i,
                                                                                   method=Llama.embed))[0])(p, ids))


@pytest.mark.slow
def test_transformers_sharded_folder_converts_to_same_logits(tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=20000.0, max_position_embeddings=256, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / math.sqrt(p.shape[1]))
    folder = tmp_path / "my-llama"
    hf.save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2

    assert cli_main(["convert", "--llama", str(folder), "--out", str(tmp_path / "dir"), "--no-tokenizer", "--quiet"]) == 0
    m = load_model_dir(tmp_path / "dir")
    assert (m.config.llama.num_kv_heads, m.config.llama.rope_theta) == (2, 20000.0)
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 11))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_llama_logits(m, jnp.asarray(ids)), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_gguf_converts_to_transformers_logits(smollm2_path, smollm2_hf, tmp_path):
    rep = convert_mod.convert(tmp_path / "smol", files={"llama": smollm2_path}, progress=False)
    assert rep.config.template == "chatml" and rep.config.llama.tie_word_embeddings
    m = load_model_dir(tmp_path / "smol")
    assert m.tokenizer is not None and m.tokenizer.chat_template
    ids = np.asarray([m.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    ours = _llama_logits(m, jnp.asarray(ids))
    hf, _ = smollm2_hf
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    err = float(np.abs(ours - ref).max())
    print(f"SmolLM2 after conversion: logits max |diff| vs transformers {err:.2e} (range {ref.max() - ref.min():.1f})")
    assert err < SMOLLM2_LOGIT_ATOL, f"logits max |diff| {err:.2e} >= {SMOLLM2_LOGIT_ATOL}"


# ------------------------------------------------------------------------------------------------------------
# 4. restore onto an (fsdp 4, tensor 2) mesh of the 8 simulated devices


@pytest.mark.slow
def test_sharded_restore_follows_the_rules_table(converted):
    mesh = make_mesh("fsdp=4,tensor=2")
    m = load_model_dir(converted, mesh=mesh)
    plain = flatten_params(load_model_dir(converted).params)
    _, axes = abstract_params(m.config)
    flat_axes = {k: v for k, v in flatten_params(axes).items()}
    sharded = 0
    for path, arr in flatten_params(m.params).items():
        want = logical_to_mesh_spec(flat_axes[path], arr.shape, mesh)
        assert arr.sharding.mesh.shape == mesh.shape and arr.sharding.spec == want, path
        sharded += want != jax.sharding.PartitionSpec()
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(plain[path]), err_msg=path)
    assert sharded > 50  # most leaves really are split
    emb = m.params["llama"]["embed_tokens"]["embedding"]  # (vocab 512, 64): vocab -> tensor, embed -> fsdp
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(256, 16)}


# ------------------------------------------------------------------------------------------------------------
# 5. bad inputs: one line, non-zero exit, nothing left behind


def test_missing_file(tmp_path, tiny_dir):
    res = run_cli("--eva-vit", tmp_path / "nope.pth", "--out", tmp_path / "out")
    assert_one_line_failure(res, "nope.pth", "not found")
    assert leftovers(tmp_path) == []


def test_file_of_the_wrong_kind(tmp_path, tiny_dir):
    res = run_cli("--eva-vit", tiny_dir / "imagebind.pth", "--out", tmp_path / "out")
    assert_one_line_failure(res, "imagebind.pth", "--eva-vit", "looks like an ImageBind checkpoint")
    assert leftovers(tmp_path) == []


def cli_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """The same CLI entry point without a new interpreter (the subprocess tests above cover the real script)."""
    code = cli_main(["convert", *[str(a) for a in args]])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_truncated_file(tmp_path, tiny_dir, capsys):
    data = (tiny_dir / "eva_vit.pth").read_bytes()
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "eva_vit.pth"
    bad.write_bytes(data[: len(data) // 2])
    res = cli_in_process(capsys, "--eva-vit", bad, "--config", "tiny_test", "--out", tmp_path / "out")
    assert_one_line_failure(res, str(bad), "truncated")
    assert leftovers(tmp_path) == ["in"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo PWNED",))


def test_unsafe_pickle(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    evil = tmp_path / "in" / "vl.pth"
    torch.save({"model": {"video_query_tokens": torch.zeros(1, 8, 32)}, "x": _Evil()}, evil)
    res = cli_in_process(capsys, "--vl-ckpt", evil, "--out", tmp_path / "out")
    assert_one_line_failure(res, "vl.pth", "not a plain weights file")
    assert "PWNED" not in res.stdout + res.stderr
    raw = tmp_path / "in" / "raw.pth"
    raw.write_bytes(pickle.dumps({"a": _Evil()}))
    assert_one_line_failure(cli_in_process(capsys, "--blip2", raw, "--out", tmp_path / "out"), "raw.pth")
    assert leftovers(tmp_path) == ["in"]


def test_shape_contradicting_the_config(tmp_path, tiny_dir, capsys):
    res = cli_in_process(capsys, "--llama", tiny_dir / "llama", "--config", "vl_llama2_7b_chat",
                         "--out", tmp_path / "out")
    assert_one_line_failure(res, "llama.vocab_size: --config vl_llama2_7b_chat.yaml says 32000",
                            "llama/config.json says 512")
    # an explicit --set wins over the file; the load itself then refuses the tensor, naming key and file
    res = cli_in_process(capsys, "--eva-vit", tiny_dir / "eva_vit.pth", "--config", "tiny_test",
                         "--set", "vit.mlp_dim=200", "--out", tmp_path / "out")
    assert_one_line_failure(res, "eva_vit.pth", "blocks.0.mlp.fc1.weight", "wrong file or wrong config")
    assert leftovers(tmp_path) == []


def test_existing_output_is_not_overwritten(tmp_path, tiny_dir, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep")
    res = cli_in_process(capsys, "--llama", tiny_dir / "llama", "--out", tmp_path / "out")
    assert_one_line_failure(res, "already exists")
    res = cli_in_process(capsys, "--llama", tiny_dir / "llama", "--out", tmp_path / "out", "--force")
    assert_one_line_failure(res, "not a vllama-jax model directory")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep"


def test_full_disk_during_the_write_leaves_nothing(tmp_path, tiny_dir, monkeypatch, capsys):
    calls = {"n": 0}
    real = model_dir_mod._write_leaf

    def failing(store, array):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(store, array)

    monkeypatch.setattr(model_dir_mod, "_write_leaf", failing)
    code = cli_main(["convert", str(tiny_dir), "--config", "tiny_test", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0], err
    assert calls["n"] == 20 and leftovers(tmp_path) == []


@pytest.mark.slow
def test_interrupt_leaves_nothing(tmp_path, tiny_dir, monkeypatch, capsys):
    def interrupted(store, array):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_dir_mod, "_write_leaf", interrupted)
    code = cli_main(["convert", "--llama", str(tiny_dir / "llama"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_release_folder_with_misnamed_file(tmp_path, tiny_dir, capsys):
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "eva_vit_g.pth").symlink_to(tiny_dir / "blip2_qformer.pth")
    res = cli_in_process(capsys, tmp_path / "rel", "--out", tmp_path / "out")
    assert_one_line_failure(res, "eva_vit_g.pth", "name suggests an EVA ViT", "looks like a BLIP-2")
    assert leftovers(tmp_path) == ["rel"]
