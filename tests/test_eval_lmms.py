"""The lmms-eval adapter against lmms-eval's real `lmms` base class, `Instance` requests and model registry
(lmms-eval 0.7.3 installed with --no-deps: its full install replaces the pinned CPU torch by a CUDA one, see
docs/eval.md), on the fixture tiny model: its answers are the chat API's answers."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import in_ci
from tests.media_helpers import make_video
from vllama_jax.inference.chat import VideoLLaMAChat
from vllama_jax.inference.generate import GenerationConfig

try:
    import lmms_eval  # noqa: F401
except ImportError:  # make test installs it; a CI run without it must fail, not skip
    lmms_eval = None
if lmms_eval is None:
    _how = "the optional lmms-eval package is missing: pip install --no-deps lmms-eval==0.7.3 loguru pytz (make test does)"
    if in_ci():
        pytest.fail(f"CI=true and {_how}", pytrace=False)
    pytest.skip(_how, allow_module_level=True)
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402

from vllama_jax.eval.lmms_adapter import LmmsRequestError, VllamaJaxLMM, manifest  # noqa: E402


def test_entry_point_manifest_resolves_to_an_lmms_model():
    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    cls = registry.get_model_class("vllama_jax")  # imports the class and checks it subclasses lmms
    assert cls is VllamaJaxLMM and issubclass(cls, lmms) and cls.is_simple


def test_model_args_as_lmms_eval_parses_them(monkeypatch):
    """The documented --model_args reach the chat: a quoted multi-axis mesh arrives whole, numbers as numbers."""
    from lmms_eval.utils import simple_parse_args_string

    seen = {}
    monkeypatch.setattr(VideoLLaMAChat, "from_model_dir",
                        classmethod(lambda cls, path, mesh=None, **kw: seen.update(path=path, mesh=mesh, **kw)))
    args = simple_parse_args_string('pretrained=models/vl-7b,mesh="data=2,fsdp=4",batch_size=8,num_frames=16')
    model = VllamaJaxLMM(**args)
    assert seen == {"path": "models/vl-7b", "mesh": "data=2,fsdp=4", "num_frames": 16} and model.batch_size == 8


@pytest.fixture(scope="module")
def adapter(tiny_model, tiny_tok, tmp_path_factory):
    cfg, params = tiny_model
    chat = VideoLLaMAChat(cfg, params, tiny_tok, num_frames=2, compilation_cache=False)
    model = VllamaJaxLMM(chat=chat, batch_size=2)
    folder = tmp_path_factory.mktemp("lmms_media")
    docs = {k: {"video": str(make_video(folder / f"v{k}.mp4", n_frames=4 + k, width=48, height=32)),
                "answer": ["yes", "no", "maybe"][k]} for k in range(3)}
    model.task_dict = {"toy": {"test": docs}}
    return model


def _instance(kind: str, args: tuple, idx: int) -> Instance:
    return Instance(request_type=kind, arguments=args, idx=idx,
                    metadata={"task": "toy", "doc_id": args[3], "repeats": 1})


def _visual(doc):
    return [doc["video"]]


def test_loglikelihood_equals_the_chat_scores(adapter):
    reqs = [_instance("loglikelihood", ("Is it moving?", lambda d: d["answer"], _visual, k, "toy", "test"), 0)
            for k in range(3)]
    got = adapter.loglikelihood(reqs)
    chat = adapter.chat
    docs = adapter.task_dict["toy"]["test"]
    ups = [chat.prepare_video(docs[k]["video"], with_audio=True) for k in range(3)]
    want = chat.score_answers(["Is it moving?"] * 3, ups, [[docs[k]["answer"]] for k in range(3)])
    assert [g[0] for g in got] == pytest.approx([float(w[0]) for w in want], abs=1e-4)
    assert all(isinstance(g[1], bool) for g in got) and all(np.isfinite(g[0]) for g in got)


def test_generate_until_equals_the_chat_answers_and_cuts_at_until(adapter):
    kw = {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}
    reqs = [_instance("generate_until", ("Describe the video.", dict(kw), _visual, k, "toy", "test"), k)
            for k in range(3)]
    got = adapter.generate_until(reqs)
    chat = adapter.chat
    docs = adapter.task_dict["toy"]["test"]
    ups = [chat.prepare_video(docs[k]["video"], with_audio=True) for k in range(3)]
    want = chat.answer_uploads(["Describe the video."] * 3, ups, GenerationConfig(do_sample=False,
                                                                                   max_new_tokens=5))
    assert got == [w.split("\n\n")[0] for w in want]
    first_word = got[0].split(" ")[0] if " " in got[0] else None
    if first_word:  # an `until` found in the text cuts it there
        cut = adapter.generate_until([_instance("generate_until", ("Describe the video.",
                                                                   dict(kw, until=[" "]), _visual, 0, "toy",
                                                                   "test"), 0)])
        assert cut == [first_word]


def test_unsupported_requests_say_so(adapter):
    two = _instance("generate_until", ("q", {"max_new_tokens": 2}, lambda d: [d["video"], d["video"]], 0, "toy",
                                       "test"), 0)
    with pytest.raises(LmmsRequestError, match="one media file per request"):
        adapter.generate_until([two])
    with pytest.raises(LmmsRequestError, match="multi-round"):
        adapter.generate_until_multi_round([two])
    missing = _instance("generate_until", ("q", {}, _visual, 7, "toy", "test"), 0)
    with pytest.raises(LmmsRequestError, match="document 7"):
        adapter.generate_until([missing])
