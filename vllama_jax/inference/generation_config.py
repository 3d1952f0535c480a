"""Decoding settings and results: `GenerationConfig` (validated on construction), `GenerationOutput`, and the
errors of the generation engine (`generate`, `beam`, `score`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import VllamaError

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
#: the finish reason of each device-side code (0: still running, reported as "length" when the loop ends)
FINISH_CODES = ("", FINISH_EOS, FINISH_STOP, FINISH_LENGTH)

StreamCallback = Callable[[int, np.ndarray], None]


class GenerationError(VllamaError):
    """Base class of the errors of the generation engine."""


class GenerationConfigError(GenerationError, ValueError):
    """A `GenerationConfig` field has an impossible value (or values that contradict each other)."""


class GenerationInputError(GenerationError, ValueError):
    """Prompts, masks or call arguments that cannot be generated from."""


# ------------------------------------------------------------------------------------------------------------
# configuration


def _id_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        ids = tuple(int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise GenerationConfigError(f"{name} must be an int or a sequence of ints, got {value!r}") from e
    if any(i < 0 for i in ids):
        raise GenerationConfigError(f"{name} has negative ids: {ids}")
    return ids


BEAM_SEMANTICS = ("4.28", "5")  # the transformers versions whose beam sampling `GenerationConfig.beam_semantics` names


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Defaults are upstream `Chat.answer`'s (upstream.md §6.5): sampling, top-k 50, top-p 0.9.

    eos_token_id: int, tuple of ints, or None = the model config's EOS; `()` disables EOS stopping.
    pad_token_id: emitted by finished rows inside the batch (never returned); None = the model config's pad id.
    stop_sequences: id sequences that finish a row when its generated ids end with one of them.
    min_new_tokens: until that many tokens exist, EOS ids and single-token stop sequences get -inf and longer stop
        sequences do not stop the row.
    early_stopping: beam search only, HF semantics (True: stop as soon as num_beams hypotheses are finished; False:
        stop when the best running beam at its current length cannot beat the worst hypothesis; "never": same
        with the best length it could still reach when length_penalty > 0).
    beam_semantics: beam *sampling* (num_beams > 1 with do_sample) as transformers "5" does it (`beam.py`:
        processors and warpers on the log-probs, then the beam scores added) or as "4.28" does it (`beam428.py`,
        what upstream's `Chat.answer` runs: warpers on the accumulated scores, beams starting equal, the stop
        sequences checked on beam 0 only). None: "5" for a plain `Generator`; the chat picks "4.28" for upstream's
        templates. Beam search without sampling always follows "5".
    """

    max_new_tokens: int = 300
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    beam_semantics: str | None = None

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise GenerationConfigError(msg)

        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            fail(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, (int, np.integer)) or self.min_new_tokens < 0:
            fail(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            fail(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.num_beams, (int, np.integer)) or self.num_beams < 1:
            fail(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                fail(f"{name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            fail(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            fail(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            fail(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.beam_semantics not in (None, *BEAM_SEMANTICS):
            fail(f"beam_semantics must be one of {', '.join(BEAM_SEMANTICS)} or None, got {self.beam_semantics!r}")
        if self.early_stopping != "never":
            object.__setattr__(self, "early_stopping", bool(self.early_stopping))
        try:
            stops = tuple(_id_tuple(s, "stop_sequences entry") for s in self.stop_sequences)
        except TypeError as e:
            raise GenerationConfigError(f"stop_sequences must be a sequence of id sequences, got "
                                        f"{self.stop_sequences!r}") from e
        if any(len(s) == 0 for s in stops):
            fail("stop_sequences may not contain an empty sequence")
        object.__setattr__(self, "stop_sequences", stops)
        if self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", _id_tuple(self.eos_token_id, "eos_token_id"))
        if self.pad_token_id is not None and (not isinstance(self.pad_token_id, (int, np.integer))
                                              or self.pad_token_id < 0):
            fail(f"pad_token_id must be an int >= 0, got {self.pad_token_id!r}")
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple (empty when unset)."""
        return self.eos_token_id or ()  # type: ignore[return-value]


@dataclass
class GenerationOutput:
    """Result of `Generator.generate`.

    tokens: per row, the generated ids without the prompt (including the EOS / stop ids that finished the row).
    finish_reasons: per row, "eos", "stop" (a stop sequence) or "length" (max_new_tokens).
    scores: per row; beam search: HF's `sequences_scores` (sum of log-probs / length ** length_penalty);
        otherwise the sum of the model's log-probabilities (raw logits) of the generated tokens.
    logits: (steps, B, V) float32 raw next-token logits of every step when `output_logits` (not for beams).
    timings: seconds: "prefill" (prompt -> first token on the host, incl. any compilation), "decode" (the rest),
        "total"; and "steps" (decode steps run).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    scores: list[float] | None = None
    logits: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


def timings(t0: float, t_first: float, t_end: float, steps: int) -> dict[str, float]:
    """`GenerationOutput.timings` from perf_counter stamps: start, first token on the host, end."""
    return dict(prefill=t_first - t0, decode=t_end - t_first, total=t_end - t0, steps=float(steps))


def finish_reasons(codes: Any) -> list[str]:
    """Per-row finish reasons from the device-side codes (a row still running at the end ran out of length)."""
    return [FINISH_CODES[int(c)] or FINISH_LENGTH for c in np.asarray(codes)]


__all__ = [
    "FINISH_EOS",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "GenerationConfig",
    "GenerationConfigError",
    "GenerationError",
    "GenerationInputError",
    "GenerationOutput",
    "StreamCallback",
    "finish_reasons",
    "timings",
]
