"""README claims about the model, its weights and inference that no other test pinned (README.md "Faithfulness" and
"Features"): the EVA ViT keeps `depth` of the checkpoint's blocks (39 of EVA-g's 40), dropout only in the trained
Q-Formers, the frame / audio-clip position limits, placeholder ids embedded as id 0, `.pth` files memory-mapped,
ViT remat, chat's context budget defaults (2000 positions, 300 new tokens: the prompt keeps the last 1700), and
`describe` on a mesh."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import TINY_CONFIG
from tests.test_train_support import tiny_config
from vllama_jax.config import ConfigError, load_model_config
from vllama_jax.inference.chat import ChatError, VideoLLaMAChat
from vllama_jax.inference.uploads import video_upload
from vllama_jax.models import build_model
from vllama_jax.models.eva_vit import EvaViT
from vllama_jax.models.video_llama import VideoLLaMA
from vllama_jax.train.loop import Trainer
from vllama_jax.tree import flatten_params
from vllama_jax.weights.load import UpstreamFiles, load_upstream
from vllama_jax.weights.readers import DictSource, open_weights


def frames_of(inputs, t: int | None = None) -> np.ndarray:
    """The fixture's (B, T, H, W, 3) video, its frames repeated cyclically to `t` frames if given."""
    v = inputs["video"].transpose(0, 2, 3, 4, 1)
    return v if t is None else v[:, np.arange(t) % v.shape[1]]


# ------------------------------------------------------------------------------------------------------------
# EVA ViT: 39 of the checkpoint's 40 blocks


def test_vit_blocks_beyond_the_config_depth_are_dropped(tiny_dir: Path, tmp_path: Path):
    """Upstream builds EVA-g with depth 39 and loads the 40-block `eva_vit_g.pth` non-strictly, so block 39 is
    dropped. Here: the fixture file plus a third block loads into the 2-block config exactly as the file without it."""
    import torch

    sd = torch.load(tiny_dir / "eva_vit.pth", weights_only=True)
    torch.manual_seed(0)
    extra = {k.replace("blocks.1.", "blocks.2."): torch.randn_like(v) for k, v in sd.items()
             if k.startswith("blocks.1.")}
    assert len(extra) > 5
    torch.save({**sd, **extra}, tmp_path / "eva_vit_3_blocks.pth")
    cfg = load_model_config(TINY_CONFIG)
    assert cfg.vit.depth == 2
    got = flatten_params(load_upstream(cfg, UpstreamFiles(eva_vit=tmp_path / "eva_vit_3_blocks.pth")))
    want = flatten_params(load_upstream(cfg, UpstreamFiles(eva_vit=tiny_dir / "eva_vit.pth")))
    assert got.keys() == want.keys() and not any("blocks_2" in k for k in got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_converter_builds_39_blocks_from_the_40_block_eva_g():
    """Without --config, a 1408-wide 40-block EVA file (the released eva_vit_g.pth, shapes only) gives vit.depth 39;
    other EVA files keep all their blocks."""
    from vllama_jax.weights.infer_config import infer_config

    def eva(width: int, blocks: int, mlp: int, patch: int = 14, grid: int = 16) -> DictSource:
        z = np.zeros((), np.float32)  # broadcast views: the shapes without the memory
        t = {"patch_embed.proj.weight": np.broadcast_to(z, (width, 3, patch, patch)),
             "pos_embed": np.broadcast_to(z, (1, grid * grid + 1, width)),
             "cls_token": np.broadcast_to(z, (1, 1, width))}
        for i in range(blocks):
            t[f"blocks.{i}.mlp.fc1.weight"] = np.broadcast_to(z, (mlp, width))
            t[f"blocks.{i}.norm1.weight"] = np.broadcast_to(z, (width,))
        return DictSource(t, "eva_vit_g.pth")

    notes: list[str] = []
    cfg = infer_config({"eva_vit": eva(1408, 40, 6144)}, notes=notes)
    assert (cfg.vit.width, cfg.vit.depth, cfg.vit.mlp_dim, cfg.vit.image_size) == (1408, 39, 6144, 224)
    assert any("unused" in n for n in notes)
    assert infer_config({"eva_vit": eva(1408, 12, 6144)}).vit.depth == 12


# ------------------------------------------------------------------------------------------------------------
# dropout only in the trained Q-Formers


def _intermediates(model, method, deterministic: bool):
    """jitted (params, x, seed) -> {module path: output} of every module the call runs."""

    @jax.jit
    def run(params, x, seed):
        _, state = model.apply({"params": params}, x, deterministic=deterministic, method=method,
                               rngs={"dropout": jax.random.PRNGKey(seed)}, capture_intermediates=True,
                               mutable=["intermediates"])
        return state["intermediates"]

    def call(params, x, seed: int) -> dict[str, np.ndarray]:
        flat = jax.tree_util.tree_flatten_with_path(run(params, x, seed))[0]
        return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}

    return call


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["video", "audio"])
def test_dropout_only_in_the_trained_qformers(tiny_model, tiny_inputs, branch: str):
    """Training mode (deterministic=False) with two dropout keys: every output of the frozen towers (ViT, ln_vision,
    image Q-Former; for the audio branch's training path ImageBind's vision tower) is bit-identical to eval mode,
    while the trained Q-Former's output changes with the key (upstream: the towers are pinned to eval,
    upstream.md §12.15; the video / audio Q-Formers train with dropout 0.1)."""
    cfg, params = tiny_model
    model = build_model(cfg)
    method = VideoLLaMA.encode_video if branch == "video" else VideoLLaMA.encode_audio_from_frames
    frozen = ("visual_encoder", "ln_vision", "qformer/") if branch == "video" else ("audio_encoder",)
    trained = f"{branch}_qformer/"
    x = frames_of(tiny_inputs)
    if branch == "audio":  # ImageBind's vision tower takes its own image size
        size = cfg.imagebind_vision.image_size
        x = np.asarray(jax.image.resize(x, x.shape[:2] + (size, size, 3), "bilinear"))
    ev = _intermediates(model, method, True)(params, x, 0)
    train = _intermediates(model, method, False)
    tr1, tr2 = train(params, x, 1), train(params, x, 2)
    towers = [k for k in ev if k.startswith(frozen)]
    assert len(towers) > 5, sorted(ev)
    for k in towers:
        np.testing.assert_array_equal(tr1[k], ev[k], err_msg=k)
        np.testing.assert_array_equal(tr2[k], ev[k], err_msg=k)
    out = f"{trained}__call__/[0]"
    assert out in ev, sorted(ev)
    assert not np.array_equal(tr1[out], ev[out]) and not np.array_equal(tr1[out], tr2[out])


# ------------------------------------------------------------------------------------------------------------
# at most max_frame_pos frames and 8 audio clips


def test_more_frames_or_clips_than_positions_is_an_error(tiny_model, tiny_tok, tiny_inputs, tiny_dir: Path,
                                                          tmp_path: Path):
    """Upstream's position tables are nn.Embedding (an index past the end raises); JAX's gather would silently return
    NaN rows. The model, chat and the trainer each refuse more frames than `max_frame_pos` (8 in the fixture model)
    and more audio clips than `num_audio_positions` (8)."""
    cfg, params = tiny_model
    model = build_model(cfg)
    video = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VideoLLaMA.encode_video))
    audio = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VideoLLaMA.encode_audio))
    assert cfg.max_frame_pos == 8 and cfg.num_audio_positions == 8
    assert np.isfinite(np.asarray(video(params, frames_of(tiny_inputs, 8)))).all()
    with pytest.raises(ValueError, match="9 frames exceed the model's max_frame_pos=8"):
        video(params, frames_of(tiny_inputs, 9))
    clips = tiny_inputs["audio"]  # (B, S, 1, mel, time)
    nine = clips[:, np.arange(9) % clips.shape[1]]
    assert np.isfinite(np.asarray(audio(params, nine[:, :8]))).all()
    with pytest.raises(ValueError, match="9 audio clips exceed the model's num_audio_positions=8"):
        audio(params, nine)

    with pytest.raises(ChatError, match=r"num_frames must be in 1\.\.8"):
        VideoLLaMAChat(cfg, params, tiny_tok, num_frames=9, compilation_cache=False)
    chat = VideoLLaMAChat(cfg, params, tiny_tok, compilation_cache=False)
    with pytest.raises(ValueError, match="9 frames exceed"):
        chat.upload(video_upload(frames_of(tiny_inputs, 9)[0], frame_message="msg. "))

    with pytest.raises(ConfigError, match="data.num_frames: 9 frames exceed the model's max_frame_pos=8"):
        Trainer(tiny_config(tiny_dir, tmp_path / "v", data={"num_frames": 9}))
    with pytest.raises(ConfigError, match="data.num_frames: 9 frames exceed the model's num_audio_positions=8"):
        Trainer(tiny_config(tiny_dir, tmp_path / "a", frozen_video_qformer=True, frozen_audio_qformer=False,
                            frozen_llama_proj=True, data={"num_frames": 9}))


def test_placeholder_ids_embed_as_id_0(tiny_model):
    """The LLaMA table is not resized for `<ImageHere>` / `<AudioHere>` (512 / 513 in the fixture tokenizer): upstream
    embeds them as id 0 (pad/unk) before the media rows overwrite them (upstream.md §12.8)."""
    cfg, params = tiny_model
    model = build_model(cfg)
    assert cfg.llama.vocab_size == 512
    emb = np.asarray(model.apply({"params": params}, jnp.asarray([[512, 513, 0, 7]]), method=VideoLLaMA.embed_tokens))
    assert np.isfinite(emb).all()
    np.testing.assert_array_equal(emb[0, 0], emb[0, 2])
    np.testing.assert_array_equal(emb[0, 1], emb[0, 2])
    assert not np.array_equal(emb[0, 3], emb[0, 2])


# ------------------------------------------------------------------------------------------------------------
# .pth read with mmap


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_pth_files_are_memory_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`torch.load(weights_only=True, mmap=True)`: opening a 128 MB .pth and reading a small tensor from it does not
    read the file into memory."""
    import torch

    path = tmp_path / "big.pth"
    big = torch.ones(32 * 2**20)  # 128 MB float32
    torch.save({"big": big, "small": torch.arange(4.0)}, path)
    del big
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    before = _rss()
    src = open_weights(path)
    assert src.shape("big") == (32 * 2**20,)
    np.testing.assert_array_equal(src.get("small"), np.arange(4.0, dtype=np.float32))
    grew = _rss() - before
    assert [(c.get("mmap"), c.get("weights_only")) for c in calls] == [(True, True)]
    assert grew < 32 * 2**20, f"opening the file grew RSS by {grew / 2**20:.0f} MB"


# ------------------------------------------------------------------------------------------------------------
# ViT remat


def test_vit_remat_gives_same_values_and_gradients(tiny_model, tiny_inputs):
    cfg, params = tiny_model
    p = params["visual_encoder"]
    x = jnp.asarray(frames_of(tiny_inputs)[0])  # (T, H, W, 3)

    def loss(p, x, remat: bool):
        return jnp.sum(jnp.sin(EvaViT(cfg.vit, remat=remat).apply({"params": p}, x)))

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    plain = jax.jit(lambda p, x: grad(p, x, False))(p, x)
    remat = jax.jit(lambda p, x: grad(p, x, True))(p, x)
    jaxpr = str(jax.make_jaxpr(lambda p, x: grad(p, x, True))(p, x))
    assert "checkpoint" in jaxpr or "remat" in jaxpr  # the blocks really are rematerialised
    assert "checkpoint" not in str(jax.make_jaxpr(lambda p, x: grad(p, x, False))(p, x))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), remat, plain)


# ------------------------------------------------------------------------------------------------------------
# chat: context budget 2000 positions, 300 new tokens by default


def test_chat_defaults_keep_the_last_1700_positions(tiny_model, tiny_tok):
    """upstream Chat.answer(max_new_tokens=300, max_length=2000): the context keeps its last 2000 - 300 positions."""
    cfg, params = tiny_model
    chat = VideoLLaMAChat(cfg, params, tiny_tok, compilation_cache=False)
    assert chat.max_length == 2000 and chat.generation_config.max_new_tokens == 300
    chat.ask(" ".join(f"word{i % 97} is number {i}." for i in range(400)))
    ctx = chat.context()
    chat.max_length = 10**6
    full = chat.context()
    assert full.truncated == 0 and full.embeds.shape[0] > 1800
    assert ctx.embeds.shape[0] == 1700 and ctx.truncated == full.embeds.shape[0] - 1700
    np.testing.assert_array_equal(ctx.embeds, full.embeds[-1700:])


# ------------------------------------------------------------------------------------------------------------
# describe sharded over a mesh


@pytest.mark.slow
def test_describe_on_8_devices_writes_the_rows_of_one_device(tiny_model, tiny_tok, tmp_path: Path, capsys,
                                                             monkeypatch: pytest.MonkeyPatch):
    """`vllama-jax describe --mesh data=2,fsdp=2,tensor=2` on 8 simulated devices: the model really is spread over
    the 8 devices, and the JSONL rows (3 videos: a batch of 2 and a batch of 1, padded to the 4 data x fsdp shards)
    equal the one-device run's."""
    import json

    from vllama_jax.cli import main as cli_main
    from vllama_jax.data.synthetic import write_video
    from vllama_jax.weights.model_dir import save_model_dir

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    cfg, params = tiny_model
    model = save_model_dir(tmp_path / "model", cfg, params, tiny_tok)
    for k in range(3):
        write_video(tmp_path / "videos" / f"{k}.mp4", num_frames=10, width=64, height=64, seed=k)
    chats = []
    load = VideoLLaMAChat.from_model_dir.__func__

    def spy(cls, *a, **kw):
        chats.append(load(cls, *a, **kw))
        return chats[-1]

    monkeypatch.setattr(VideoLLaMAChat, "from_model_dir", classmethod(spy))
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")  # in-process: leave this session's JAX settings alone
    args = ["describe", "--model", str(model), "--videos", str(tmp_path / "videos"), "--prompt",
            "Describe the video.", "--batch-size", "2", "--num-frames", "2", "--no-audio", "--greedy",
            "--max-new-tokens", "4", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "one.jsonl")]) == 0, capsys.readouterr().err
    assert cli_main(args + ["--out", str(tmp_path / "mesh.jsonl"), "--mesh", "data=2,fsdp=2,tensor=2"]) == 0, \
        capsys.readouterr().err
    kernel = chats[1].params["llama"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert chats[0].mesh is None and len(kernel.sharding.device_set) == 8
    one, mesh = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("one.jsonl", "mesh.jsonl"))
    assert len(one) == 3 and all(isinstance(r.get("answer"), str) for r in one)
    assert mesh == one
