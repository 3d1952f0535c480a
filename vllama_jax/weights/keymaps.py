"""Declarative key maps: upstream checkpoint names <-> paths in the params pytree.

A `KeyMap` is a list of `Rule`s. A rule names an upstream key pattern (`{i}` stands for a layer index), one or
more params paths (joined with "/", `{i}` substituted), and a transform hook that turns the PyTorch tensor into
the Flax layout (transpose a Linear, reorder a Conv kernel, split a fused projection) and back for export.

`load_component` applies a key map to a `TensorSource` and checks the result against the expected shapes of
the model: missing or unexpected keys and wrong shapes raise `WeightsError` naming the keys and the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .arrays import cast, transpose
from .readers import TensorSource, WeightsError

Array = np.ndarray


# ------------------------------------------------------------------------------------------------------------
# transforms: (forward: torch layout -> list of flax arrays, inverse: list of flax arrays -> torch layout)


def _t(a: Array) -> Array:
    return transpose(a)


TRANSFORMS: dict[str, tuple[Callable[[Array], list[Array]], Callable[[list[Array]], Array]]] = {
    "none": (lambda a: [a], lambda xs: xs[0]),
    # nn.Linear weight (out, in) -> Dense kernel (in, out)
    "linear": (lambda a: [_t(a)], lambda xs: _t(xs[0])),
    # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
    "conv2d": (lambda a: [np.ascontiguousarray(a.transpose(2, 3, 1, 0))],
               lambda xs: np.ascontiguousarray(xs[0].transpose(3, 2, 0, 1))),
    # Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O)
    "conv3d": (lambda a: [np.ascontiguousarray(a.transpose(2, 3, 4, 1, 0))],
               lambda xs: np.ascontiguousarray(xs[0].transpose(4, 3, 0, 1, 2))),
    # fused [q; k; v] Linear weight (3D, D) -> three kernels (D, D)
    "split3_linear": (lambda a: [_t(p) for p in np.split(a, 3, axis=0)],
                      lambda xs: np.concatenate([_t(x) for x in xs], axis=0)),
    # fused [q; k; v] bias (3D,) -> three biases
    "split3": (lambda a: list(np.split(a, 3, axis=0)), lambda xs: np.concatenate(xs, axis=0)),
}


#: forward transforms that streaming readers (`load_component(..., on_tensor=...)`) receive as views, no copy: the
#: consumer copies them in pieces (the conversion's writer, one stored chunk at a time) or whole (`arrays.contiguous`)
VIEW_TRANSFORMS: dict[str, Callable[[Array], list[Array]]] = {"linear": lambda a: [a.T]}


@dataclass(frozen=True)
class Rule:
    src: str
    dst: tuple[str, ...]
    transform: str = "none"

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")

    @property
    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.src).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def rule(src: str, dst: str | Sequence[str], transform: str = "none") -> Rule:
    return Rule(src, (dst,) if isinstance(dst, str) else tuple(dst), transform)


@dataclass(frozen=True)
class KeyMap:
    """One component's mapping. `claims` are regexes of upstream keys this component owns in a shared file;
    `ignore` are regexes of keys that are known and deliberately dropped (buffers, deleted modules)."""

    name: str
    rules: tuple[Rule, ...]
    claims: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def with_prefix(self, src_prefix: str, dst_prefix: str = "") -> "KeyMap":
        """The same map with upstream keys under `src_prefix` and params under `dst_prefix`."""
        dp = (dst_prefix.rstrip("/") + "/") if dst_prefix else ""
        return KeyMap(
            self.name,
            tuple(Rule(src_prefix + r.src, tuple(dp + d for d in r.dst), r.transform) for r in self.rules),
            tuple("^" + re.escape(src_prefix) + c.lstrip("^") for c in self.claims),
            tuple("^" + re.escape(src_prefix) + c.lstrip("^") for c in self.ignore),
        )

    def claims_key(self, key: str) -> bool:
        return any(re.match(c, key) for c in self.claims)

    def ignores_key(self, key: str) -> bool:
        return any(re.match(c, key) for c in self.ignore)

    def match(self, key: str) -> tuple[Rule, tuple[str, ...]] | None:
        for r in self.rules:
            m = r.regex.match(key)
            if m:
                i = m.groupdict().get("i")
                return r, tuple(d.replace("{i}", i) if i is not None else d for d in r.dst)
        return None

    def inverse(self, flat_params: Mapping[str, Array], layer_counts: Mapping[str, int] | None = None) -> dict[str, Array]:
        """params (flat "/" paths) -> upstream state dict, for every rule whose targets are all present."""
        out: dict[str, Array] = {}
        for r in self.rules:
            if "{i}" in r.src:
                idx = sorted({int(m.group(1)) for d in r.dst for p in flat_params
                              for m in [re.match("^" + re.escape(d).replace(r"\{i\}", r"(\d+)") + "$", p)] if m})
                for i in idx:
                    dsts = [d.replace("{i}", str(i)) for d in r.dst]
                    if all(d in flat_params for d in dsts):
                        out[r.src.replace("{i}", str(i))] = TRANSFORMS[r.transform][1]([np.asarray(flat_params[d]) for d in dsts])
            elif all(d in flat_params for d in r.dst):
                out[r.src] = TRANSFORMS[r.transform][1]([np.asarray(flat_params[d]) for d in r.dst])
        return out


def _short_list(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_component(
    source: TensorSource,
    keymap: KeyMap,
    expected: Mapping[str, tuple[int, ...]],
    *,
    dtype: Any = None,
    strict_unexpected: bool = True,
    on_tensor: Callable[[str, Array], None] | None = None,
) -> dict[str, Array]:
    """Read `keymap`'s tensors from `source` into a flat {params path: array} dict.

    `expected` maps every params path of the component to its shape. Keys of the file that the map `claims` but
    cannot place are unexpected (an error when `strict_unexpected`); keys not claimed belong to other components
    and are skipped. `on_tensor` is called for each produced array instead of keeping it (streaming conversion;
    `VIEW_TRANSFORMS` then give views, e.g. a Linear weight's transpose); the returned dict is then empty.
    """
    produced: dict[str, Array] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for key in source.keys():
        if not keymap.claims_key(key):
            continue
        if keymap.ignores_key(key):
            continue
        hit = keymap.match(key)
        if hit is None:
            unexpected.append(key)
            continue
        r, dsts = hit
        if all(d not in expected for d in dsts):
            unexpected.append(key)  # e.g. a layer beyond the configured depth that is not ignored
            continue
        forward = (VIEW_TRANSFORMS.get(r.transform) if on_tensor is not None else None) or TRANSFORMS[r.transform][0]
        arrays = forward(source.get(key))
        if len(arrays) != len(dsts):
            raise WeightsError(source.path, f"{key}: transform {r.transform} gave {len(arrays)} arrays for {len(dsts)} targets")
        for d, a in zip(dsts, arrays):
            want = tuple(expected.get(d, ()))
            if tuple(a.shape) != want:
                raise WeightsError(
                    source.path,
                    f"tensor {key!r} has shape {tuple(source.shape(key))}, which does not fit {keymap.name} "
                    f"parameter {d} of shape {want} (wrong file or wrong config?)",
                )
            if dtype is not None:
                a = cast(a, dtype)
            if d in seen:
                raise WeightsError(source.path, f"{d} is written by more than one key (duplicate {key!r})")
            seen.add(d)
            if on_tensor is not None:
                on_tensor(d, a)
            else:
                produced[d] = a
    missing = sorted(set(expected) - seen)
    if missing and len(missing) == len(expected):
        raise WeightsError(
            source.path,
            f"none of the {keymap.name} weights are in this file (expected keys such as "
            f"{_short_list([r.src.replace('{i}', '0') for r in keymap.rules], 3)}); is it the right file?",
        )
    if missing:
        raise WeightsError(source.path, f"{keymap.name}: missing parameters {_short_list(missing)}")
    if unexpected and strict_unexpected:
        raise WeightsError(source.path, f"{keymap.name}: unexpected keys {_short_list(unexpected)}")
    return produced


# ------------------------------------------------------------------------------------------------------------
# vision-side key maps (upstream.md §2.3, 3.4, 10). Upstream names are Video-LLaMA model keys; params paths follow
# vllama_jax.models.


def eva_vit_keymap(depth: int) -> KeyMap:
    """`eva_vit_g.pth` (keys without the `visual_encoder.` prefix). Blocks >= depth are dropped, as upstream's
    non-strict load drops block 39."""
    v = "visual_encoder/"
    b = v + "blocks_{i}/"
    rules = (
        rule("cls_token", v + "cls_token"),
        rule("pos_embed", v + "pos_embed"),
        rule("patch_embed.proj.weight", v + "patch_embed/kernel", "conv2d"),
        rule("patch_embed.proj.bias", v + "patch_embed/bias"),
        rule("blocks.{i}.norm1.weight", b + "norm1/scale"),
        rule("blocks.{i}.norm1.bias", b + "norm1/bias"),
        rule("blocks.{i}.attn.qkv.weight", (b + "attn/query/kernel", b + "attn/key/kernel", b + "attn/value/kernel"),
             "split3_linear"),
        rule("blocks.{i}.attn.q_bias", b + "attn/query/bias"),
        rule("blocks.{i}.attn.v_bias", b + "attn/value/bias"),
        rule("blocks.{i}.attn.proj.weight", b + "attn/proj/kernel", "linear"),
        rule("blocks.{i}.attn.proj.bias", b + "attn/proj/bias"),
        rule("blocks.{i}.norm2.weight", b + "norm2/scale"),
        rule("blocks.{i}.norm2.bias", b + "norm2/bias"),
        rule("blocks.{i}.mlp.fc1.weight", b + "mlp/fc1/kernel", "linear"),
        rule("blocks.{i}.mlp.fc1.bias", b + "mlp/fc1/bias"),
        rule("blocks.{i}.mlp.fc2.weight", b + "mlp/fc2/kernel", "linear"),
        rule("blocks.{i}.mlp.fc2.bias", b + "mlp/fc2/bias"),
    )
    extra_blocks = r"blocks\.(?!(" + "|".join(str(i) for i in range(depth)) + r")\.)\d+\."
    return KeyMap(
        "EVA ViT (visual_encoder)",
        rules,
        claims=(r"cls_token$", r"pos_embed$", r"patch_embed\.", r"blocks\."),
        # the released file has 40 blocks; only `depth` are built. fc_norm/head/norm exist in some EVA exports.
        ignore=(extra_blocks, r"norm\.", r"fc_norm\.", r"head\.", r"rel_pos_bias\."),
    )


def qformer_keymap(upstream: str, params: str, with_query_tokens: str | None = None) -> KeyMap:
    """One Q-Former (`Qformer`, `video_Qformer` or `audio_Qformer`) -> params subtree `params`."""
    p = upstream + ".bert."
    q = params + "/"
    l = q + "layer_{i}/"
    rules: list[Rule] = [
        rule(p + "embeddings.LayerNorm.weight", q + "embeddings_layernorm/scale"),
        rule(p + "embeddings.LayerNorm.bias", q + "embeddings_layernorm/bias"),
    ]
    for up, ours in (("attention", "attention"), ("crossattention", "crossattention")):
        for proj in ("query", "key", "value"):
            rules += [
                rule(f"{p}encoder.layer.{{i}}.{up}.self.{proj}.weight", f"{l}{ours}/{proj}/kernel", "linear"),
                rule(f"{p}encoder.layer.{{i}}.{up}.self.{proj}.bias", f"{l}{ours}/{proj}/bias"),
            ]
        rules += [
            rule(f"{p}encoder.layer.{{i}}.{up}.output.dense.weight", f"{l}{ours}/output/kernel", "linear"),
            rule(f"{p}encoder.layer.{{i}}.{up}.output.dense.bias", f"{l}{ours}/output/bias"),
            rule(f"{p}encoder.layer.{{i}}.{up}.output.LayerNorm.weight", f"{l}{ours}/output_layernorm/scale"),
            rule(f"{p}encoder.layer.{{i}}.{up}.output.LayerNorm.bias", f"{l}{ours}/output_layernorm/bias"),
        ]
    rules += [
        rule(p + "encoder.layer.{i}.intermediate_query.dense.weight", l + "intermediate_query/kernel", "linear"),
        rule(p + "encoder.layer.{i}.intermediate_query.dense.bias", l + "intermediate_query/bias"),
        rule(p + "encoder.layer.{i}.output_query.dense.weight", l + "output_query/kernel", "linear"),
        rule(p + "encoder.layer.{i}.output_query.dense.bias", l + "output_query/bias"),
        rule(p + "encoder.layer.{i}.output_query.LayerNorm.weight", l + "output_query_layernorm/scale"),
        rule(p + "encoder.layer.{i}.output_query.LayerNorm.bias", l + "output_query_layernorm/bias"),
    ]
    e = re.escape(upstream)
    return KeyMap(
        f"Q-Former ({upstream})",
        tuple(rules),
        claims=(rf"{e}\.",),
        # modules Video-LLaMA deletes (text FFN, word/position embeddings, MLM head) and the position_ids buffer
        ignore=(
            rf"{e}\.bert\.embeddings\.(position_ids|word_embeddings|position_embeddings)",
            rf"{e}\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
            rf"{e}\.cls\.",
        ),
    )


def simple_keymap(name: str, pairs: Sequence[tuple[str, str, str]]) -> KeyMap:
    """Small maps of whole tensors (query tokens, position tables, projections, ln_vision)."""
    return KeyMap(name, tuple(rule(s, d, t) for s, d, t in pairs),
                  claims=tuple("^" + re.escape(s) + "$" for s, _, _ in pairs))


def combined(name: str, *maps: KeyMap) -> KeyMap:
    """One map made of several (their rules, claims and ignores, in order)."""
    return KeyMap(name, sum((m.rules for m in maps), ()), sum((m.claims for m in maps), ()),
                  sum((m.ignore for m in maps), ()))


def ln_vision_keymap() -> KeyMap:
    return simple_keymap("ln_vision", [("ln_vision.weight", "ln_vision/scale", "none"),
                                       ("ln_vision.bias", "ln_vision/bias", "none")])


def image_qformer_keymap() -> KeyMap:
    """The BLIP-2 checkpoint's frozen image Q-Former, its query tokens and `ln_vision`."""
    tok = simple_keymap("query_tokens", [("query_tokens", "query_tokens", "none")])
    return combined("BLIP-2 Q-Former", qformer_keymap("Qformer", "qformer"), ln_vision_keymap(), tok)


def _branch_keymap(branch: str, upstream_qformer: str, position_table: str, projection: str) -> KeyMap:
    """A trainable branch: its Q-Former, query tokens, position table and projection into the LLM."""
    tokens = f"{branch}_query_tokens"
    side = simple_keymap(f"{branch} branch", [
        (tokens, tokens, "none"),
        (f"{position_table}.weight", f"{position_table}/embedding", "none"),
        (f"{projection}.weight", f"{projection}/kernel", "linear"),
        (f"{projection}.bias", f"{projection}/bias", "none"),
    ])
    return combined(f"{branch} branch ({upstream_qformer}, {tokens}, {position_table}, {projection})",
                    qformer_keymap(upstream_qformer, upstream_qformer.lower()), side)


def video_branch_keymap() -> KeyMap:
    """The trainable vision-branch parameters (VL checkpoint, upstream.md §10.3)."""
    return _branch_keymap("video", "video_Qformer", "video_frame_position_embedding", "llama_proj")


def audio_branch_keymap() -> KeyMap:
    """The trainable audio-branch parameters (AL checkpoint, upstream.md §10.4)."""
    return _branch_keymap("audio", "audio_Qformer", "audio_position_embedding", "audio_llama_proj")


# Buffers that Video-LLaMA checkpoints carry besides parameters (upstream.md §10.1, tests/fixtures/README.md §1.2): recognised and
# dropped by every loader of a VL/AL checkpoint.
CHECKPOINT_BUFFERS = (
    r"^(Qformer|video_Qformer|audio_Qformer)\.bert\.embeddings\.position_ids$",
    r"^llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",
    r"^audio_encoder\.modality_preprocessors\.text\.mask$",
    r"^audio_encoder\.modality_postprocessors\.\w+\.\d+\.log_logit_scale$",
)
