"""Video-LLaMA-2-7B at its real size on this machine: build a synthetic release, convert it, load it, chat.

    python bench/realsize.py --out-dir /work/tmp/realsize --keep --json realsize.json      # the real sizes
    python bench/realsize.py --scale tiny --out-dir /tmp/rs --json rs.json                 # same structure, tiny
    python bench/realsize.py --only bf16_vl --max-new-tokens 32 --keep ...

The release folder has the real file formats, key names, shapes and dtypes, with random values: `eva_vit_g.pth`
(fp16 state dict, 40 blocks), `blip2_pretrained_flant5xxl.pth` (`{'model': ...}` with the text FFN, MLM head and
`t5_proj` the converter ignores), `imagebind_huge.pth` (audio and vision trunks, heads, the logit-scale buffers),
`VL_LLaMA_2_7B_Finetuned.pth` and `AL_LLaMA_2_7B_Finetuned.pth` (`{'model', 'optimizer', 'config', 'scaler',
'epoch'}` as upstream's runner saves them: trained parameters, every buffer of the model, AdamW state) and
`llama-2-7b-chat-hf/` (config.json, two fp16 safetensors shards with an index, a 32000-piece sentencepiece
tokenizer trained here on generated text). Names and layouts come from the converter's own key maps run backwards
(`KeyMap.inverse`), so the files are what the converter reads.

Phases, each in its own child process so that its peak resident set (VmHWM) is its own:
  build     the release (kept with --keep and reused)
  convert   `convert_weights.py RELEASE --out MODEL --dtype bfloat16` (every file: both branches)
  bandwidth the copy bandwidth (bench/generate.py's `copy_bandwidth`), for the decode bound
  per variant:
    load    `load_model_dir` alone: seconds, peak RSS, parameter bytes
    chat    load, then twice: upload the clip (encode) and answer one question, greedy, exactly --max-new-tokens
            tokens: encode s and time to first token, the first time (compilation included) and the second;
            decode tok/s of the second answer against the bound (copy bandwidth / bytes of the LLM's weights, all
            read once per step; the copy and read bandwidths measured right after the decode in the same process,
            as this VM's memory speed moves by the minute); then 3 paired rounds, each one more answer between two
            bandwidth measurements, held against the higher (`paired`, `decode_of_bound_paired`: their median,
            what the 60% target is checked on); peak RSS of it all (before those measurements)
  variants: bf16_vl (bf16 weights, vision branch, the video only) and int8_av (the LLM quantized to int8 at load,
  `VideoLLaMAChat.from_model_dir(MODEL, quantize="int8")`, both branches, video with its audio).

A phase that fails is recorded as {"answered": false, "error": "..."} and the run goes on.
Targets (issue 19, this 2-core 24 GiB machine): bf16_vl answers, load peak <= parameter bytes + 1.5 GB, whole chat
peak <= parameter bytes + 3 GB; int8_av answers with a peak <= 12 GB; decode >= 60% of its bound in both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllama_jax.config import ModelConfig, load_model_config  # noqa: E402

SHARED = Path(os.environ.get("VLLAMA_SHARED", ROOT.parent / "shared"))
DEFAULT_VIDEO = SHARED / "media" / "dog_barking.mp4"
FIXTURE_LLAMA = ROOT / "tests" / "fixtures" / "tiny_vl" / "llama"
VARIANTS = ("bf16_vl", "int8_av")
QUESTION = "What is happening in this video? Describe what you see and hear."

# file names of the release (docs/upstream.md §9; README "With the released weights")
EVA, BLIP2, IMAGEBIND, VL, AL, LLM = ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "imagebind_huge.pth",
                                      "VL_LLaMA_2_7B_Finetuned.pth", "AL_LLaMA_2_7B_Finetuned.pth",
                                      "llama-2-7b-chat-hf")
# per scale: the model config the release is built at, the --config the conversion needs (None: inferred from
# the files, as a user converting the real release does), the LLaMA shard split, and the tokenizer
SCALES = {
    "real": {"config": ROOT / "configs" / "al_llama2_7b_chat.yaml", "convert_config": None,
             "first_shard_fraction": 0.74, "vocab_pieces": 32000},
    "tiny": {"config": ROOT / "configs" / "tiny_test.yaml", "convert_config": "tiny_test",
             "first_shard_fraction": 0.5, "vocab_pieces": None},
}


# ------------------------------------------------------------------------------------------------------------
# build: random values with the real names, shapes and formats


class RandomPool:
    """Random N(0, 0.02) values, served as slices of one 128 MiB pool per dtype at random offsets: generating
    7 billion fresh normals would take longer than converting them. A pool larger than a stored chunk (16 MiB)
    keeps every chunk incompressible, as real weights are."""

    def __init__(self, seed: int = 0, size: int = 32 << 20):
        self.rng = np.random.default_rng(seed)
        self.base = (self.rng.standard_normal(size, dtype=np.float32) * 0.02)
        self.pools: dict[str, np.ndarray] = {}

    def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        pool = self.pools.setdefault(dt.str, self.base.astype(dt))
        n = math.prod(shape)
        flat = np.empty(n, dt)
        start, done = int(self.rng.integers(0, pool.size)), 0
        while done < n:  # wrap around the pool
            take = min(n - done, pool.size - start)
            flat[done:done + take] = pool[start:start + take]
            done, start = done + take, 0
        return flat.reshape(shape)


def _chunks(flat_shapes: Mapping[str, tuple[int, ...]]) -> Iterator[list[str]]:
    """Params paths grouped by layer (`.../blocks_3/...`, `.../layers_12/...`): a fused upstream tensor (qkv) needs
    all its parts at once, and one layer at a time keeps the build's memory small."""
    groups: dict[str, list[str]] = {}
    for p in flat_shapes:
        m = re.match(r"^(.*?/(?:blocks|layer|layers)_\d+)/", p)
        groups.setdefault(m.group(1) if m else p.split("/", 1)[0], []).append(p)
    yield from groups.values()


def upstream_tensors(kind: str, cfg: ModelConfig, pool: RandomPool, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(upstream name, array in the PyTorch layout) of every parameter the converter reads from a file of `kind`,
    from random params run backwards through the converter's key map."""
    from vllama_jax.models import abstract_for_groups
    from vllama_jax.models.groups import groups_of_file
    from vllama_jax.tree import flatten_params
    from vllama_jax.weights.load import keymap_for

    abstract, _ = abstract_for_groups(cfg, groups_of_file(kind))
    shapes = {p: tuple(v.shape) for p, v in flatten_params(abstract).items()}
    keymap = keymap_for(kind, cfg)
    produced = 0
    for paths in _chunks(shapes):
        part = {p: pool.array(shapes[p], dtype) for p in paths}
        out = keymap.inverse(part)
        produced += sum(a.size for a in out.values())
        yield from out.items()
    expected = sum(math.prod(s) for s in shapes.values())
    if produced != expected:
        raise RuntimeError(f"{kind}: the key map produced {produced} of {expected} parameters")


def _torch(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _save_pth(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _branch_checkpoint(kind: str, cfg: ModelConfig, pool: RandomPool, with_audio_model: bool) -> dict[str, Any]:
    """A VL/AL checkpoint as upstream's runner writes it (docs/upstream.md §8.5): the trained parameters, every
    buffer of the model it trained, AdamW's state for the trained parameters, the config, the scaler, the epoch."""
    import torch

    model = {k: _torch(v) for k, v in upstream_tensors(kind, cfg, pool, np.float32)}
    buffers: dict[str, Any] = {}
    qformers = ["Qformer", "video_Qformer"] + (["audio_Qformer"] if with_audio_model else [])
    for q in qformers:
        buffers[f"{q}.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    head_dim = cfg.llama.hidden_size // cfg.llama.num_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(cfg.llama.num_layers):
        buffers[f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    if with_audio_model:
        buffers["audio_encoder.modality_preprocessors.text.mask"] = torch.full((77, 77), float("-inf")).triu(1)
        for m in ("text", "audio", "depth", "thermal", "imu"):
            buffers[f"audio_encoder.modality_postprocessors.{m}.1.log_logit_scale"] = torch.tensor(math.log(20.0))
    names = list(model)
    decay = [i for i, n in enumerate(names) if model[n].ndim >= 2 and "query_tokens" not in n]
    no_decay = [i for i in range(len(names)) if i not in decay]
    state = {i: {"step": torch.tensor(5000.0), "exp_avg": _torch(pool.array(tuple(model[n].shape), np.float32)),
                 "exp_avg_sq": _torch(np.abs(pool.array(tuple(model[n].shape), np.float32)))}
             for i, n in enumerate(names)}
    groups = [{"lr": 3e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
               "params": ids} for wd, ids in ((0.05, decay), (0.0, no_decay))]
    return {"model": {**model, **buffers}, "optimizer": {"state": state, "param_groups": groups},
            "config": {"run": {"task": "video_text_pretrain", "init_lr": 3e-5, "max_epoch": 5},
                       "model": {"arch": "video_llama", "llama_model": "llama-2-7b-chat-hf"}},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 1234},
            "epoch": 4}


_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: Any,
                      make: Callable[[str], np.ndarray]) -> None:
    """A safetensors file written tensor by tensor (the header first, from the shapes): the shard is never whole
    in memory."""
    dt = np.dtype(dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt.name], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            a = make(name)
            assert a.shape == tuple(shape) and a.dtype == dt, name
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    os.replace(tmp, path)


def _train_tokenizer(folder: Path, pieces: int, work: Path) -> None:
    """A `pieces`-piece LLaMA-style sentencepiece model (BPE, byte fallback, <unk> <s> </s> = 0 1 2), trained on
    generated text (cached in `work`): the released tokenizer is not redistributable here, its size is what
    matters (the embedding table and the LM head have 32000 rows)."""
    import sentencepiece as spm

    model = work / f"sp{pieces}.model"
    if not model.is_file():
        rng = np.random.default_rng(0)
        syll = np.array([a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou"))
        words = np.array(["".join(syll[rng.integers(0, syll.size, size=rng.integers(1, 5))]) for _ in range(60000)])
        lines = words[rng.integers(0, words.size, size=(40000, 12))]
        corpus = work / "corpus.txt"
        text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "upstream.md").read_text()
        corpus.write_text(text + "".join(" ".join(row) + ".\n" for row in lines))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(work / f"sp{pieces}"), vocab_size=pieces, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            num_threads=os.cpu_count() or 1, minloglevel=2, max_sentence_length=100000)
    shutil.copy(model, folder / "tokenizer.model")


def build_release(out: Path, scale: str) -> dict[str, Any]:
    """Write the synthetic release folder `out`; returns its size."""
    import torch

    spec = SCALES[scale]
    cfg = load_model_config(spec["config"])
    pool = RandomPool()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # EVA ViT-g: a plain fp16 state dict with the file's 40 blocks (the model uses 39; upstream.md §2)
    eva = {k: _torch(v) for k, v in upstream_tensors("eva_vit", cfg, pool, np.float16)}
    last = cfg.vit.depth - 1
    for k in [k for k in eva if k.startswith(f"blocks.{last}.")]:
        eva[k.replace(f"blocks.{last}.", f"blocks.{last + 1}.", 1)] = eva[k].clone()
    _save_pth(eva, out / EVA)
    del eva

    # BLIP-2: {'model': ...} fp32, with what Video-LLaMA drops (text FFN, word/position embeddings, MLM head, T5
    # projection) so the converter has to skip it
    blip = {k: _torch(v) for k, v in upstream_tensors("blip2", cfg, pool, np.float32)}
    q, h, inter = cfg.qformer, cfg.qformer.hidden_size, cfg.qformer.intermediate_size
    for i in range(q.num_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        blip.update({p + "intermediate.dense.weight": _torch(pool.array((inter, h), np.float32)),
                     p + "intermediate.dense.bias": _torch(pool.array((inter,), np.float32)),
                     p + "output.dense.weight": _torch(pool.array((h, inter), np.float32)),
                     p + "output.dense.bias": _torch(pool.array((h,), np.float32)),
                     p + "output.LayerNorm.weight": _torch(pool.array((h,), np.float32)),
                     p + "output.LayerNorm.bias": _torch(pool.array((h,), np.float32))})
    vocab = 30523  # BERT's vocabulary + [DEC]
    blip.update({"Qformer.bert.embeddings.word_embeddings.weight": _torch(pool.array((vocab, h), np.float32)),
                 "Qformer.bert.embeddings.position_embeddings.weight": _torch(pool.array((512, h), np.float32)),
                 "Qformer.cls.predictions.bias": _torch(pool.array((vocab,), np.float32)),
                 "t5_proj.weight": _torch(pool.array((4096 if scale == "real" else 2 * h, h), np.float32)),
                 "t5_proj.bias": _torch(pool.array((4096 if scale == "real" else 2 * h,), np.float32))})
    _save_pth({"model": blip}, out / BLIP2)
    del blip

    # ImageBind-Huge: a plain fp32 state dict; the logit-scale buffers the converter ignores
    ib = {k: _torch(v) for k, v in upstream_tensors("imagebind", cfg, pool, np.float32)}
    for m in ("text", "audio", "depth", "thermal", "imu"):
        ib[f"modality_postprocessors.{m}.1.log_logit_scale"] = torch.tensor(math.log(20.0))
    _save_pth(ib, out / IMAGEBIND)
    del ib

    # the trained branches, as the runner saved them
    _save_pth(_branch_checkpoint("vl_ckpt", cfg, pool, with_audio_model=False), out / VL)
    _save_pth(_branch_checkpoint("al_ckpt", cfg, pool, with_audio_model=True), out / AL)

    # LLaMA-2-7B-chat: HF folder, fp16 safetensors in two shards with an index
    llm = out / LLM
    llm.mkdir(exist_ok=True)
    lc = cfg.llama
    hf_shapes = _hf_llama_shapes(lc)
    names = list(hf_shapes.items())
    total = sum(math.prod(s) * 2 for _, s in names)
    split, size, first = spec["first_shard_fraction"] * total, 0, []
    for n, s in names:
        if size >= split:
            break
        first.append((n, s))
        size += math.prod(s) * 2
    shards = [first, names[len(first):]]
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(llm / fname, shard, np.float16, lambda n: pool.array(hf_shapes[n], np.float16))
        weight_map.update({n: fname for n, _ in shard})
    (llm / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (llm / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "hidden_act": "silu", "hidden_size": lc.hidden_size,
        "intermediate_size": lc.intermediate_size, "initializer_range": 0.02,
        "max_position_embeddings": lc.max_position_embeddings, "num_attention_heads": lc.num_heads,
        "num_hidden_layers": lc.num_layers, "num_key_value_heads": lc.num_kv_heads, "pretraining_tp": 1,
        "rms_norm_eps": lc.rms_norm_eps, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True,
        "vocab_size": lc.vocab_size}, indent=2))
    (llm / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.9, "top_p": 0.6}, indent=2))
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURE_LLAMA / f, llm / f)
    if spec["vocab_pieces"]:
        work = out.parent / "tokenizer-work"
        work.mkdir(exist_ok=True)
        _train_tokenizer(llm, spec["vocab_pieces"], work)
    else:
        shutil.copy(FIXTURE_LLAMA / "tokenizer.model", llm / "tokenizer.model")
    files = [f for f in out.rglob("*") if f.is_file()]
    return {"seconds": time.perf_counter() - t0, "bytes": sum(f.stat().st_size for f in files),
            "files": {str(f.relative_to(out)): f.stat().st_size for f in sorted(files)}}


def _hf_llama_shapes(lc: Any) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of a LLaMA (transformers' `LlamaForCausalLM` state dict)."""
    hd = lc.head_dim_resolved
    h, kv, inter = lc.hidden_size, lc.num_kv_heads * hd, lc.intermediate_size
    out = {"model.embed_tokens.weight": (lc.vocab_size, h)}
    for i in range(lc.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (lc.num_heads * hd, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, lc.num_heads * hd),
                    p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                    p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    if not lc.tie_word_embeddings:
        out["lm_head.weight"] = (lc.vocab_size, h)
    return out


# ------------------------------------------------------------------------------------------------------------
# phases (each runs in a child: `python bench/realsize.py --phase NAME --phase-args JSON`)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _tree_bytes(tree: Any) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def phase_build(a: Mapping[str, Any]) -> dict[str, Any]:
    return build_release(Path(a["release"]), a["scale"])


def phase_convert(a: Mapping[str, Any]) -> dict[str, Any]:
    from vllama_jax.weights.convert import convert

    rep = convert(a["model"], folder=a["release"], config=a["config"], dtype=a["dtype"], force=True,
                  progress=False)
    read = sum(f.stat().st_size for f in Path(a["release"]).rglob("*") if f.is_file())
    return {"seconds": rep.seconds, "release_bytes": read, "mb_per_s": read / rep.seconds / 1e6,
            "peak_rss_gb": rep.peak_rss_bytes / 1e9, "start_rss_gb": rep.start_rss_bytes / 1e9,
            "largest_tensor_mb": rep.largest_tensor_bytes / 1e6, "params": rep.total_params,
            "param_gb": rep.total_bytes / 1e9, "config": dataclasses.asdict(rep.config.precision)}


def phase_bandwidth(a: Mapping[str, Any]) -> dict[str, Any]:
    return _bandwidths()


def _bandwidths() -> dict[str, float]:
    """Copy (numpy, jax, the faster of the two) and read bandwidth in GB/s (bench/generate.py's probes)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from generate import copy_bandwidth, read_bandwidth

    bw_np, bw_jax = copy_bandwidth()
    return {"copy_gb_s": max(bw_np, bw_jax) / 1e9, "numpy_gb_s": bw_np / 1e9, "jax_gb_s": bw_jax / 1e9,
            "read_gb_s": read_bandwidth() / 1e9}


def _load(a: Mapping[str, Any]) -> Any:
    """The variant's model, as a user loads it: int8 through the `quantize` option; the vision-only variant
    without the audio groups, as the VL preset (`vl_llama2_7b_chat`: the AL one without the audio branch)."""
    from vllama_jax.inference.chat import AUDIO_GROUPS
    from vllama_jax.weights.model_dir import load_model_dir

    if a["variant"] == "int8_av":
        return load_model_dir(a["model"], quantize="int8")
    loaded = load_model_dir(a["model"], exclude=AUDIO_GROUPS)
    return dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, equip_audio_branch=False))


def phase_load(a: Mapping[str, Any]) -> dict[str, Any]:
    import jax

    jax.devices()
    start = _status("VmRSS:")
    t = time.perf_counter()
    loaded = _load(a)
    jax.block_until_ready(loaded.params)
    return {"load_s": time.perf_counter() - t, "load_peak_rss_gb": _status("VmHWM:") / 1e9,
            "load_start_rss_gb": start / 1e9, "param_gb": _tree_bytes(loaded.params) / 1e9,
            "llm_param_gb": _tree_bytes(loaded.params.get("llama", {})) / 1e9}


def phase_chat(a: Mapping[str, Any]) -> dict[str, Any]:
    import jax

    from vllama_jax.inference import GenerationConfig, VideoLLaMAChat

    t = time.perf_counter()
    huge = bool(a.get("huge_pages"))
    if a["variant"] == "int8_av":
        chat = VideoLLaMAChat.from_model_dir(a["model"], quantize="int8", huge_pages=huge)
    else:  # the chat owns what it loads, as `from_model_dir`'s does
        chat = VideoLLaMAChat.from_loaded(_load(a), donate_llm=True, huge_pages=huge)
    jax.block_until_ready(chat.params)
    load_s = time.perf_counter() - t
    up = chat.prepare_video(a["video"], with_audio=a["variant"] == "int8_av")
    n = int(a["max_new_tokens"])
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n)
    # twice the same fresh conversation: the first pays for the compilations, the second is the steady state
    answers, timings, encode = [], [], []
    for _ in range(2):
        t = time.perf_counter()
        chat.upload(up)
        encode.append(time.perf_counter() - t)
        chat.ask(QUESTION)
        answers.append(chat.answer(gen))
        timings.append(dict(chat.last_output.timings))
    warm = timings[-1]
    steps = warm.get("steps", 0.0)
    peak = _status("VmHWM:")  # before the bandwidth probes below allocate their buffers
    # This VM's memory speed moves by 2x within minutes (a 2-thread read: 36 to 72 GB/s): the bounds come from
    # copy and read bandwidths measured right after the decode, in the same process; and in paired rounds, each a
    # further answer in the same conversation between two measurements (its bound: the higher of the two).
    bw = _bandwidths()
    paired = []
    for _ in range(int(a.get("paired_rounds", 3))):
        before = _bandwidths()
        chat.ask(QUESTION)
        chat.answer(gen)
        t = chat.last_output.timings
        after = _bandwidths()
        paired.append({"decode_tok_s": t["steps"] / t["decode"],
                       "copy_gb_s": max(before["copy_gb_s"], after["copy_gb_s"]),
                       "read_gb_s": max(before["read_gb_s"], after["read_gb_s"])})
    return {"answered": all(isinstance(x, str) for x in answers) and steps > 0, "answers": answers,
            "copy_gb_s_after_decode": bw["copy_gb_s"], "read_gb_s_after_decode": bw["read_gb_s"], "paired": paired,
            "audio_clips": 0 if up.clips is None else int(up.clips.shape[0]), "upload_note": up.note,
            "chat_load_s": load_s, "encode_cold_s": encode[0], "encode_s": encode[1],
            "ttft_cold_s": timings[0]["prefill"], "ttft_s": warm["prefill"],
            "decode_tok_s": steps / warm["decode"] if warm.get("decode") else 0.0,
            "llm_weight_gb": _tree_bytes(chat.params["llama"]) / 1e9, "chat_peak_rss_gb": peak / 1e9}


PHASES = {"build": phase_build, "convert": phase_convert, "bandwidth": phase_bandwidth, "load": phase_load,
          "chat": phase_chat}


def run_phase(name: str, args: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Run one phase in a child; its JSON result, or {"error": ...} naming how it failed."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    t = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, __file__, "--phase", name, "--phase-args", json.dumps(args)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{name}: timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    lines = res.stdout.strip().splitlines()
    if res.returncode or not lines or not lines[-1].startswith("{"):
        err = [x for x in res.stderr.strip().splitlines() if x.strip()]
        # the exception's own line, not JAX's note after it
        raised = [x for x in err if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", x)]
        tail = (raised or err or [f"exit status {res.returncode}"])[-1]
        if res.returncode < 0 or res.returncode == 137:
            tail = f"killed (signal {-res.returncode if res.returncode < 0 else 9}; out of memory?): {tail}"
        return {"error": f"{name}: {tail}"[:500], "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def _load_average() -> str:
    """The 1, 5 and 15 min load averages: the machine is shared, figures mean little without them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def check_targets(name: str, r: Mapping[str, Any]) -> dict[str, bool]:
    """The issue's targets for one variant (missing figures count as not met)."""
    p = r.get("param_gb", math.inf)
    ratio = r.get("decode_tok_s", 0.0) / r["decode_bound_tok_s"] if r.get("decode_bound_tok_s") else 0.0
    ratio = r.get("decode_of_bound_paired", ratio)  # the decodes measured between two bandwidth probes
    t = {"answers": bool(r.get("answered")), "decode_60pct_of_bound": ratio >= 0.6}
    if name == "bf16_vl":
        t["load_peak_le_params_plus_1.5gb"] = r.get("load_peak_rss_gb", math.inf) <= p + 1.5
        t["chat_peak_le_params_plus_3gb"] = r.get("chat_peak_rss_gb", math.inf) <= p + 3.0
    else:
        t["chat_peak_le_12gb"] = r.get("chat_peak_rss_gb", math.inf) <= 12.0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="real",
                    help="real: Video-LLaMA-2-7B's sizes; tiny: the same files at the test model's sizes")
    ap.add_argument("--out-dir", default=str(ROOT.parent / "tmp-realsize"),
                    help="where the release and the model directory go (real: ~17 GB + ~17 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the built release and model, and reuse them")
    ap.add_argument("--only", choices=VARIANTS, action="append", help="run only this variant (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--video", default=str(DEFAULT_VIDEO), help="the clip to chat about")
    ap.add_argument("--no-chat", action="store_true", help="build and convert only")
    ap.add_argument("--huge-pages", action="store_true",
                    help="the chats move the LLM's weights into 2 MiB pages (the CLI's --huge-pages)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per phase")
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--phase-args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](json.loads(args.phase_args)), default=str))
        return

    out = Path(args.out_dir).absolute() / args.scale
    release, model = out / "release", out / "model"
    results: dict[str, Any] = {"scale": args.scale, "machine": f"{os.cpu_count()} CPUs, "
                               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "load_average_start": _load_average(), "max_new_tokens": args.max_new_tokens}

    def report(key: str, r: Mapping[str, Any]) -> None:
        results[key] = dict(r)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("files", "answers", "config")}
        print(f"[{key}] {json.dumps(shown, default=str)}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")

    if not (args.keep and (release / "BUILT").is_file()):
        shutil.rmtree(release, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
        r = run_phase("build", {"release": str(release), "scale": args.scale}, args.timeout)
        report("build", r)
        if "error" in r:
            sys.exit(f"error: {r['error']}")
        (release / "BUILT").write_text(json.dumps(r.get("bytes")))
    if not (args.keep and (model / "manifest.json").is_file() and (out / "convert.json").is_file()):
        r = run_phase("convert", {"release": str(release), "model": str(model), "dtype": "bfloat16",
                                  "config": SCALES[args.scale]["convert_config"]}, args.timeout)
        if "error" not in r:
            (out / "convert.json").write_text(json.dumps(r))
    else:
        r = json.loads((out / "convert.json").read_text()) | {"reused": True}
    report("convert", r)
    if "error" in r:
        sys.exit(f"error: {r['error']}")

    if not args.no_chat:
        bw = run_phase("bandwidth", {}, args.timeout)
        report("bandwidth", bw)
        for v in args.only or VARIANTS:
            a = {"variant": v, "model": str(model), "video": args.video, "max_new_tokens": args.max_new_tokens,
                 "huge_pages": args.huge_pages}
            r: dict[str, Any] = {"answered": False, "huge_pages": args.huge_pages}
            load = run_phase("load", a, args.timeout)
            r.update({k: x for k, x in load.items() if k != "wall_s"} if "error" not in load
                     else {"load_error": load["error"]})
            chat = run_phase("chat", a, args.timeout)
            if "error" in chat:
                r["error"] = chat["error"]
            else:
                r.update({k: x for k, x in chat.items() if k != "wall_s"})
                copy_gb_s = r.get("copy_gb_s_after_decode") or bw.get("copy_gb_s")
                read_gb_s = r.get("read_gb_s_after_decode") or bw.get("read_gb_s")
                if copy_gb_s and r.get("llm_weight_gb"):
                    r["decode_bound_tok_s"] = copy_gb_s / r["llm_weight_gb"]
                    r["decode_of_bound"] = r["decode_tok_s"] / r["decode_bound_tok_s"]
                if read_gb_s and r.get("llm_weight_gb"):
                    # what a plain read of the weights would allow at that moment
                    r["decode_of_read_bound"] = r["decode_tok_s"] * r["llm_weight_gb"] / read_gb_s
                if r.get("paired") and r.get("llm_weight_gb"):
                    for p in r["paired"]:
                        p["of_bound"] = p["decode_tok_s"] * r["llm_weight_gb"] / p["copy_gb_s"]
                        p["of_read_bound"] = p["decode_tok_s"] * r["llm_weight_gb"] / p["read_gb_s"]
                    r["decode_of_bound_paired"] = statistics.median(p["of_bound"] for p in r["paired"])
            r["targets"] = check_targets(v, r)
            r["load_average"] = _load_average()
            report(v, r)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
