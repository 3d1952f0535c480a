"""The Video-LLaMA composition: encoders -> query embeddings -> spliced LLaMA prompt -> logits / loss.

Methods mirror upstream `VideoLLAMA` (upstream.md §1): `encode_video` (= `encode_videoQformer_visual`), `encode_image`
(a 1-frame video), `encode_audio` (`encode_audioQformer` on fbank clips), `encode_audio_from_frames`
(`encode_audioQformer` with ImageBind's vision modality, used to train the audio branch), `encode_audiovideo`
(`encode_videoQformer_audiovideo`), `splice_media` (in-place N-for-N placeholder replacement), and the two
training losses of upstream `forward`: `caption_loss` (path B) and `instruction_loss` (path A).

Layouts are channels-last: frames (B, T, H, W, 3), audio clips (B, S, 1, mel, time) as the media layer gives them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import ModelConfig, QFormerConfig
from .eva_vit import EvaViT
from .imagebind import ImageBindEncoder
from .layers import Dense, LayerNorm, as_dtype, dense, with_axes
from .llama import Llama, init_cache
from .lora import LlamaLora
from .qformer import QFormer

IGNORE_INDEX = -100


class VideoLLaMA(nn.Module):
    config: ModelConfig
    remat_vit: bool = False
    remat_llama: bool = False
    # the LLaMA layers and the ViT blocks each as one scan over stacked parameters (`Llama.scan_layers`,
    # `EvaViT.scan_layers`; training only: no KV cache)
    scan_layers: bool = False

    def setup(self) -> None:
        c = self.config
        p = c.precision
        vit_dt, qf_dt = as_dtype(p.vit), as_dtype(p.qformer)
        train_pdt = as_dtype(p.trainable_params)
        self.visual_encoder = EvaViT(c.vit, dtype=vit_dt, param_dtype=as_dtype(p.vit_params), remat=self.remat_vit,
                                     scan_layers=self.scan_layers)
        self.ln_vision = LayerNorm(c.vit.ln_vision_eps)
        self.qformer = QFormer(c.qformer, dtype=qf_dt)
        self.query_tokens = _query_tokens(self, "query_tokens", c.qformer, jnp.float32)
        self.video_frame_position_embedding = _position_table(c.max_frame_pos, c.qformer.hidden_size, train_pdt)
        self.video_qformer = QFormer(c.video_qformer, dtype=qf_dt, param_dtype=train_pdt)
        self.video_query_tokens = _query_tokens(self, "video_query_tokens", c.video_qformer, train_pdt)
        self.llama_proj = _llm_projection(c.llama.hidden_size, c.video_qformer, qf_dt, train_pdt)
        if c.equip_audio_branch:
            self.audio_encoder = ImageBindEncoder(c.imagebind_audio, c.imagebind_vision, with_vision=True,
                                                  dtype=as_dtype(p.imagebind))
            self.audio_position_embedding = _position_table(c.num_audio_positions, c.imagebind_audio.out_dim,
                                                            train_pdt)
            self.audio_qformer = QFormer(c.audio_qformer, dtype=qf_dt, param_dtype=train_pdt)
            self.audio_query_tokens = _query_tokens(self, "audio_query_tokens", c.audio_qformer, train_pdt)
            self.audio_llama_proj = _llm_projection(c.llama.hidden_size, c.audio_qformer, qf_dt, train_pdt)
        self.llama = llama_module(c, remat=self.remat_llama, scan=self.scan_layers)
        if c.lora.enabled:  # the LLM's LoRA adapters: trained (fp32 master weights), the LLM stays frozen
            self.llama_lora = LlamaLora(c.llama, c.lora, param_dtype=train_pdt)

    # ------------------------------------------------------------------------------------------------------
    # vision branch

    def encode_frames(self, frames: jax.Array) -> jax.Array:
        """(B, T, H, W, 3) -> per-frame image Q-Former outputs (B, T, Q, hidden). Frozen, always eval mode."""
        b, t = frames.shape[:2]
        x = frames.reshape((b * t,) + frames.shape[2:])  # sample-major: row b*T + t
        tokens = self.ln_vision(self.visual_encoder(x).astype(jnp.float32))
        queries = jnp.broadcast_to(self.query_tokens, (b * t,) + self.query_tokens.shape[1:])
        out = self.qformer(queries, tokens, deterministic=True)
        return out.reshape((b, t) + out.shape[1:])

    def video_qformer_memory(self, frame_queries: jax.Array) -> jax.Array:
        """Add the frame position embedding to each frame's queries, then flatten frame-major to (B, T*Q, h)."""
        b, t, q, h = frame_queries.shape
        pos = self._frame_positions(t)
        x = frame_queries + pos[None, :, None, :].astype(frame_queries.dtype)
        return x.reshape(b, t * q, h)

    def _frame_positions(self, t: int) -> jax.Array:
        """Rows 0..t-1 of the frame position table; more frames than rows is an error, as upstream's nn.Embedding
        raises (a jnp gather out of range would silently give NaN rows)."""
        if t > self.config.max_frame_pos:
            raise ValueError(f"{t} frames exceed the model's max_frame_pos={self.config.max_frame_pos} "
                             "(one learned position per frame)")
        return self.video_frame_position_embedding(jnp.arange(t))

    def encode_video(self, frames: jax.Array, deterministic: bool = True) -> jax.Array:
        """`encode_videoQformer_visual`: (B, T, H, W, 3) -> (B, Nv, D_llm)."""
        return self.video_from_frame_queries(self.encode_frames(frames), deterministic)

    def video_from_frame_queries(self, frame_queries: jax.Array, deterministic: bool = True) -> jax.Array:
        """The video branch's trained part: frozen towers' output (B, T, Q, hidden) -> LLM rows (B, Nv, D_llm)."""
        return self._video_from_memory(self.video_qformer_memory(frame_queries), deterministic)

    def _video_from_memory(self, memory: jax.Array, deterministic: bool) -> jax.Array:
        b = memory.shape[0]
        queries = jnp.broadcast_to(self.video_query_tokens, (b,) + self.video_query_tokens.shape[1:])
        hidden = self.video_qformer(queries, memory, deterministic=deterministic)
        return self.llama_proj(hidden).astype(jnp.float32)

    def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """An image is a 1-frame video (frame position 0 is still added): (B, H, W, 3) -> (B, Nv, D_llm)."""
        return self.encode_video(images[:, None], deterministic)

    # ------------------------------------------------------------------------------------------------------
    # audio branch

    def _audio_from_segments(self, segments: jax.Array, deterministic: bool) -> jax.Array:
        b, s, _ = segments.shape
        if s > self.config.num_audio_positions:  # upstream: nn.Embedding raises; a jnp gather would give NaN rows
            raise ValueError(f"{s} audio clips exceed the model's num_audio_positions="
                             f"{self.config.num_audio_positions} (one learned position per 2-s clip)")
        x = segments + self.audio_position_embedding(jnp.arange(s))[None].astype(segments.dtype)
        queries = jnp.broadcast_to(self.audio_query_tokens, (b,) + self.audio_query_tokens.shape[1:])
        hidden = self.audio_qformer(queries, x, deterministic=deterministic)
        return self.audio_llama_proj(hidden).astype(jnp.float32)

    def audio_segments(self, clips: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """(B, S, 1, mel, time) fbank clips -> ImageBind (feature (B, S, width), embedding (B, S, out_dim))."""
        b, s = clips.shape[:2]
        x = clips.reshape((b * s,) + clips.shape[-2:])[..., None]  # channels-last (N, mel, time, 1)
        feature, embedding = self.audio_encoder.encode_audio(x, deterministic=deterministic)
        return feature.reshape(b, s, -1), embedding.reshape(b, s, -1)

    def encode_audio(self, clips: jax.Array, deterministic: bool = True) -> jax.Array:
        """`encode_audioQformer` (audio modality): (B, S, 1, mel, time) -> (B, Na, D_llm). S <= 8."""
        _, embedding = self.audio_segments(clips, deterministic)
        return self._audio_from_segments(embedding, deterministic)

    def encode_audio_from_frames(self, frames: jax.Array, deterministic: bool = True) -> jax.Array:
        """`encode_audioQformer` (vision modality), how upstream trains the audio branch: (B, T, H, W, 3)."""
        return self.encode_media(frames, "audio", deterministic)

    def encode_audiovideo(self, frames: jax.Array, clips: jax.Array, deterministic: bool = True) -> jax.Array:
        """`encode_videoQformer_audiovideo` (unused upstream): the ImageBind audio *features* (768-d, pre-projection)
        plus the same frame positions are appended to the frame tokens of the video Q-Former memory. Needs S == T."""
        frame_queries = self.encode_frames(frames)
        b, t = frame_queries.shape[:2]
        feature, _ = self.audio_segments(clips, deterministic=True)
        pos = self._frame_positions(t)
        audio_tokens = feature + pos[None].astype(feature.dtype)
        memory = jnp.concatenate([self.video_qformer_memory(frame_queries), audio_tokens], axis=1)
        return self._video_from_memory(memory, deterministic)

    def media_from_features(self, frame_queries: jax.Array, audio_embeddings: jax.Array, with_audio: jax.Array,
                            deterministic: bool = True) -> jax.Array:
        """Both branches' LLM rows from the frozen towers' outputs (``encode_frames`` -> (B, T, Q, hidden),
        ``audio_segments``' embedding -> (B, S, out_dim)): the rows of ``encode_audio`` then ``encode_video`` (the
        audio+video upload's placeholder order) where ``with_audio`` (B,) is true, else the video rows first (a
        video-only upload reads only those)."""
        video = self.video_from_frame_queries(frame_queries, deterministic)
        audio = self._audio_from_segments(audio_embeddings, deterministic)
        flag = with_audio.astype(bool)[:, None, None]
        return jnp.where(flag, jnp.concatenate([audio, video], 1), jnp.concatenate([video, audio], 1))

    def frozen_frame_features(self, frames: jax.Array, branch: str = "video") -> jax.Array:
        """The frozen towers' output for a branch's training media, the part a feature cache stores
        (`train.encode`): the video branch's per-frame image Q-Former outputs (B, T, Q, hidden) (``encode_frames``),
        the audio branch's per-frame ImageBind vision embeddings (B, T, out_dim) (upstream trains the audio branch
        on frames, upstream.md §1.8). Frames (B, T, H, W, 3). Always eval mode."""
        if branch == "video":
            return self.encode_frames(frames)
        if branch == "audio":
            b, t = frames.shape[:2]
            _, embedding = self.audio_encoder.encode_vision(frames.reshape((b * t,) + frames.shape[2:]),
                                                            deterministic=True)
            return embedding.reshape(b, t, -1)
        raise ValueError(f"unknown branch {branch!r} (video or audio)")

    def encode_media(self, frames: jax.Array, branch: str = "video", deterministic: bool = True,
                     cached: bool = False) -> jax.Array:
        """Training media path: train_flag 0 -> vision branch, 1 -> audio branch fed with frames (upstream.md §1.8).
        ``cached``: ``frames`` holds the frozen towers' output instead (``frozen_frame_features`` of the branch);
        the towers are skipped."""
        if branch not in ("video", "audio"):
            raise ValueError(f"unknown branch {branch!r} (video or audio)")
        features = frames.astype(jnp.float32) if cached else self.frozen_frame_features(frames, branch)
        if branch == "video":
            return self.video_from_frame_queries(features, deterministic)
        return self._audio_from_segments(features, deterministic)

    # ------------------------------------------------------------------------------------------------------
    # LLM side

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """LLaMA input embeddings; ids outside the (un-resized) table, i.e. the placeholders, embed as id 0."""
        ids = jnp.where(input_ids >= self.config.llama.vocab_size, 0, input_ids)
        return self.llama.embed(ids)

    def splice_media(self, embeds: jax.Array, input_ids: jax.Array, media: jax.Array, placeholder_id: int) -> jax.Array:
        """Replace each row's run of N consecutive `placeholder_id` positions by its N media rows (path A step 4).

        The run's length and contiguity are checked on the host (`check_placeholders`); here the k-th placeholder
        of a row takes media row k.
        """
        is_ph = input_ids == placeholder_id
        k = jnp.clip(jnp.cumsum(is_ph, axis=1) - 1, 0, media.shape[1] - 1)
        picked = jnp.take_along_axis(media.astype(embeds.dtype), k[..., None], axis=1)
        return jnp.where(is_ph[..., None], picked, embeds)

    def llm(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
            position_ids: jax.Array | None = None, cache: Any = None, deterministic: bool = True,
            **kw: Any) -> tuple[jax.Array, Any]:
        """The LLaMA decoder, with its LoRA adapters when the config has them (their dropout unless
        `deterministic`)."""
        adapters = self.llama_lora() if self.config.lora.enabled else None
        return self.llama(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          adapters=adapters, deterministic=deterministic, **kw)

    # ------------------------------------------------------------------------------------------------------
    # training forward (upstream `forward`)

    def instruction_inputs(self, frames: jax.Array, input_ids: jax.Array, placeholder_id: int,
                           branch: str = "video", deterministic: bool = True, cached: bool = False) -> jax.Array:
        media = self.encode_media(frames, branch, deterministic, cached)
        return self.splice_media(self.embed_tokens(input_ids), input_ids, media, placeholder_id)

    def instruction_loss(self, frames: jax.Array, input_ids: jax.Array, labels: jax.Array,
                         attention_mask: jax.Array, placeholder_id: int, branch: str = "video",
                         deterministic: bool = True, cached: bool = False) -> dict[str, jax.Array]:
        """Path A (conv_type 'multi'): in-place N-for-N placeholder replacement, labels as the dataset built them.
        ``cached``: see ``encode_media``."""
        embeds = self.instruction_inputs(frames, input_ids, placeholder_id, branch, deterministic, cached)
        logits, _ = self.llm(embeds, attention_mask=attention_mask, deterministic=deterministic)
        return causal_lm_loss(logits, labels) | {"logits": logits, "inputs_embeds": embeds}

    def feature_instruction_loss(self, frame_queries: jax.Array, audio_embeddings: jax.Array, with_audio: jax.Array,
                                 input_ids: jax.Array, labels: jax.Array, attention_mask: jax.Array,
                                 label_positions: jax.Array, placeholder_id: int,
                                 prompt_prefix: jax.Array | None = None,
                                 deterministic: bool = True) -> dict[str, jax.Array]:
        """Path A for both branches at once, from cached frozen-tower outputs (``media_from_features``): the media
        rows replace the placeholders in order (audio block, then video block), as the chat splices an audio+video
        upload. The LM head runs only at ``label_positions`` (B, K) (``data.batch.label_positions``; -1 = none):
        the loss of ``causal_lm_loss`` without the vocabulary projection of the unlabelled positions (most of a
        conversation's tokens, and a fifth of a small LLM's work). ``prompt_prefix`` (1, P): tokens every row
        starts with, ahead of ``input_ids``: run once into a KV cache that every row continues from (without LoRA
        it depends on nothing trained, so nothing flows back through it)."""
        media = self.media_from_features(frame_queries, audio_embeddings, with_audio, deterministic)
        embeds = self.splice_media(self.embed_tokens(input_ids), input_ids, media, placeholder_id)
        cache = None
        if prompt_prefix is not None:
            b, n = input_ids.shape[0], prompt_prefix.shape[1]
            cache = init_cache(self.config.llama, 1, n + input_ids.shape[1], embeds.dtype)
            _, cache = self.llm(self.embed_tokens(prompt_prefix), cache=cache, deterministic=deterministic,
                                logits_slice=slice(-1, None))
            cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, b, axis=0), cache)
        hidden, _ = self.llm(embeds, attention_mask=attention_mask, cache=cache, deterministic=deterministic,
                             return_hidden=True)
        valid = label_positions >= 0
        pos = jnp.where(valid, label_positions, 0)
        logits = self.llama.logits(jnp.take_along_axis(hidden, pos[..., None], axis=1))
        targets = jnp.take_along_axis(labels, pos + 1, axis=1)
        return causal_lm_loss(logits, jnp.where(valid, targets, IGNORE_INDEX), shifted=True)

    def caption_inputs(self, frames: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
                       prompt_before: jax.Array | None = None, prompt_after: jax.Array | None = None,
                       branch: str = "video", deterministic: bool = True,
                       cached: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Path B: [BOS, p_before, media, p_after, text] embeddings, mask and labels (upstream.md §1.8 B, 7.7).
        ``cached``: see ``encode_media``."""
        c = self.config.llama
        media = self.encode_media(frames, branch, deterministic, cached)
        b = media.shape[0]
        parts = []
        if prompt_before is not None:
            parts.append(self.embed_tokens(jnp.broadcast_to(prompt_before, (b, prompt_before.shape[-1]))))
        parts.append(media)
        if prompt_after is not None:
            parts.append(self.embed_tokens(jnp.broadcast_to(prompt_after, (b, prompt_after.shape[-1]))))
        bos = self.embed_tokens(jnp.full((b, 1), c.bos_token_id, jnp.int32))
        wrapped = jnp.concatenate(parts, axis=1).astype(bos.dtype)
        text = self.embed_tokens(text_ids)
        embeds = jnp.concatenate([bos, wrapped, text], axis=1)
        n_prefix = 1 + wrapped.shape[1]
        mask = jnp.concatenate([jnp.ones((b, n_prefix), jnp.int32), text_mask.astype(jnp.int32)], axis=1)
        # upstream masks by pad *id* (pad = unk = 0), not by the attention mask
        targets = jnp.where(text_ids == c.pad_token_id, IGNORE_INDEX, text_ids)
        labels = jnp.concatenate([jnp.full((b, n_prefix), IGNORE_INDEX, targets.dtype), targets], axis=1)
        return embeds, mask, labels

    def caption_loss(self, frames: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
                     prompt_before: jax.Array | None = None, prompt_after: jax.Array | None = None,
                     branch: str = "video", deterministic: bool = True, cached: bool = False) -> dict[str, jax.Array]:
        embeds, mask, labels = self.caption_inputs(frames, text_ids, text_mask, prompt_before, prompt_after,
                                                   branch, deterministic, cached)
        logits, _ = self.llm(embeds, attention_mask=mask, deterministic=deterministic)
        return causal_lm_loss(logits, labels) | {"logits": logits, "inputs_embeds": embeds, "attention_mask": mask,
                                                 "labels": labels}

    # ------------------------------------------------------------------------------------------------------

    def init_all(self, frames: jax.Array, clips: jax.Array | None, input_ids: jax.Array) -> jax.Array:
        """Touch every submodule once so `init` creates the whole params tree."""
        out = self.encode_video(frames)
        if self.config.equip_audio_branch:
            iv = self.config.imagebind_vision
            # ImageBind's vision tower has its own input size (224 upstream)
            vis_frames = jnp.zeros(frames.shape[:2] + (iv.image_size, iv.image_size, 3), frames.dtype)
            out = out.sum() + self.encode_audio(clips).sum() + self.encode_audio_from_frames(vis_frames).sum()
        logits, _ = self.llm(self.embed_tokens(input_ids))
        return logits.sum() + jnp.sum(out)


def llama_module(config: ModelConfig, remat: bool = False, scan: bool = False) -> Llama:
    """The LLaMA decoder with the config's precision: compute and parameter dtypes, and the residual stream."""
    p = config.precision
    return Llama(config.llama, dtype=as_dtype(p.llama), param_dtype=as_dtype(p.llama_params), remat=remat,
                 torch_arithmetic=p.llama_arithmetic == "torch", lora=config.lora, scan_layers=scan)


def _torch_linear_init(fan_in: int) -> Any:
    """PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (upstream projections, upstream.md §3.5)."""
    bound = 1.0 / fan_in ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _query_tokens(module: nn.Module, name: str, qformer: QFormerConfig, param_dtype: Any) -> jax.Array:
    """The learned queries (1, Q, hidden) of a Q-Former, created in `module`'s setup."""
    return module.param(name, with_axes(nn.initializers.normal(0.02), (None, "queries", "embed")),
                        (1, qformer.num_query_tokens, qformer.hidden_size), param_dtype)


def _position_table(num: int, dim: int, param_dtype: Any) -> nn.Embed:
    """A frame / audio-segment position table: nn.Embedding's default init N(0, 1), as upstream (upstream.md §3.5)."""
    return nn.Embed(num, dim, param_dtype=param_dtype,
                    embedding_init=with_axes(nn.initializers.normal(1.0), ("positions", "embed")))


def _llm_projection(llm_width: int, qformer: QFormerConfig, dtype: Any, param_dtype: Any) -> Dense:
    """A Q-Former's output -> the LLM's embedding space (`llama_proj`, `audio_llama_proj`)."""
    return dense(llm_width, (None, "embed"), dtype=dtype, param_dtype=param_dtype,
                 kernel_init=_torch_linear_init(qformer.hidden_size))


def causal_lm_loss(logits: jax.Array, labels: jax.Array, shifted: bool = False) -> dict[str, jax.Array]:
    """HF causal-LM loss: logits[:, :-1] vs labels[:, 1:], ignore -100, mean over all kept tokens of the batch.

    The labels are shifted instead of the logits (the last position gets -100): the same sum, but no slice of the
    (batch, length, vocab) tensor, which the TPU compiler mis-fuses with the fsdp reduce-scatter of the batch
    (a RET_CHECK failure compiling stage 1 for v5p), and one fewer copy of the largest activation. ``shifted``:
    the labels are aligned with the logits already (``labels[:, t]`` is the target of ``logits[:, t]``).
    """
    shift_labels = labels if shifted else jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)],
                                                          axis=1)
    valid = shift_labels != IGNORE_INDEX
    safe = jnp.where(valid, shift_labels, 0)
    logits = logits.astype(jnp.float32)
    # -log_softmax at the label, without materialising log_softmax over the vocabulary
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    count = jnp.sum(valid)
    return {"loss": total / jnp.maximum(count, 1), "loss_sum": total, "num_tokens": count}


def check_placeholders(input_ids: Any, num_media_tokens: int, placeholder_id: int) -> None:
    """Host-side check of path A's rule: each row holds exactly N consecutive placeholders (else ValueError)."""
    ids = np.asarray(input_ids)
    for b, row in enumerate(ids):
        pos = np.flatnonzero(row == placeholder_id)
        if len(pos) != num_media_tokens:
            raise ValueError(f"row {b}: {len(pos)} placeholder tokens, expected {num_media_tokens}")
        if len(pos) and pos[-1] - pos[0] + 1 != len(pos):
            raise ValueError(f"row {b}: the placeholder tokens are not consecutive")
