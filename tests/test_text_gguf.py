"""SmolLM2-135M-Instruct GGUF tokenizer ("hf" family): loading, round trips, ChatML, placeholders, our samples."""
import warnings

import numpy as np
import pytest

from vllama_jax.text import (
    IGNORE_INDEX,
    TokenizerError,
    ask,
    chat_instruction_sample,
    chat_prompt,
    get_template,
    instruction_sample,
    load_tokenizer,
    prompt_segments,
    read_gguf_metadata,
    render_chat_template,
    segment_token_ids,
    stop_token_sequences,
    upload,
    video_upload_message,
)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def meta(smollm2_path):
    return read_gguf_metadata(smollm2_path)


def test_loads_with_gguf_metadata(smol, meta, smollm2_path):
    assert smol.family == "hf"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert smol.bos_id == meta["tokenizer.ggml.bos_token_id"]
    assert smol.eos_id == meta["tokenizer.ggml.eos_token_id"]
    assert smol.pad_id == meta["tokenizer.ggml.padding_token_id"]
    assert smol.adds_bos is bool(meta["tokenizer.ggml.add_bos_token"]) is False
    assert smol.chat_template == meta["tokenizer.chat_template"]
    assert smol.id_to_token(smol.eos_id) == "<|im_end|>"
    # folder holding the GGUF works too
    assert load_tokenizer(smollm2_path.parent).base_vocab_size == smol.base_vocab_size


# ids produced by transformers' public path (AutoTokenizer.from_pretrained(folder, gguf_file=...) + add_tokens)
KNOWN_IDS = {
    "Hello world!": [19556, 905, 17],
    "<|im_start|>user\nhi<|im_end|>\n": [1, 4093, 198, 6004, 2, 198],
    "x <ImageHere> y<AudioHere>": [104, 216, 49152, 329, 49153],
    "a\n\n\nb": [81, 1116, 198, 82],
}


@pytest.mark.parametrize("text", sorted(KNOWN_IDS))
def test_known_ids(smol, text):
    assert smol.encode(text) == KNOWN_IDS[text]


@pytest.mark.slow
def test_public_transformers_path_agrees(smollm2_path, smol, monkeypatch):
    """Loading goes through transformers' GGUF tokenizer converter on metadata we parse ourselves (fast); if that
    private API fails it falls back to AutoTokenizer.from_pretrained(gguf_file=...). Both must agree."""
    from vllama_jax.text import tokenizer_files as tkmod

    def broken(meta):
        raise RuntimeError("simulated API change")

    monkeypatch.setattr(tkmod, "_hf_from_gguf_fast", broken)
    slow = load_tokenizer(smollm2_path)
    for text in list(KNOWN_IDS) + ["ünïcode 你好 🤖 café", "  leading  ", "digits 1234567890"]:
        assert slow.encode(text) == smol.encode(text)
    for attr in ("bos_id", "eos_id", "pad_id", "unk_id", "base_vocab_size", "image_placeholder_id", "chat_template"):
        assert getattr(slow, attr) == getattr(smol, attr), attr


def test_placeholders_outside_base_vocab(smol):
    assert smol.base_vocab_size == 49152
    assert (smol.image_placeholder_id, smol.audio_placeholder_id) == (49152, 49153)
    ids = smol.encode("<Video><ImageHere><ImageHere></Video> hi <AudioHere>")
    assert ids.count(smol.image_placeholder_id) == 2 and ids.count(smol.audio_placeholder_id) == 1
    assert all(i < smol.base_vocab_size for i in ids if i not in (49152, 49153))


@pytest.mark.parametrize("text", [
    "Hello world!",
    "  leading and trailing  ",
    "ünïcode 你好 🤖 café",
    "digits 1234567890 and 3.14",
    "line\nbreaks\n\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<Image><ImageHere></Image> describe",
])
def test_round_trip(smol, text):
    ids = smol.encode(text)
    assert smol.decode(ids) == text
    assert smol.encode(text, add_bos=True) == [smol.bos_id] + ids


def test_decode_skip_special(smol):
    ids = smol.encode("<|im_start|>user\n<ImageHere> hi<|im_end|>")
    assert smol.decode(ids, skip_special_tokens=True) == "user\n<ImageHere> hi"


def test_chatml_two_turns(smol):
    msgs = [{"role": role, "content": text}
            for role, text in [("user", "hi"), ("assistant", "hello"), ("user", "how are you?"), ("assistant", "fine")]]
    default_sys = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    expected = (
        default_sys
        + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        + "<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\nfine<|im_end|>\n"
    )
    ours = render_chat_template(smol.chat_template, msgs)
    assert ours == expected
    assert ours == smol.hf.apply_chat_template(msgs, tokenize=False)
    gen = render_chat_template(smol.chat_template, msgs[:3], add_generation_prompt=True)
    assert gen == smol.hf.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")
    # special tokens of the template are single ids
    ids = smol.encode(ours)
    assert ids.count(smol.token_to_id("<|im_start|>")) == 5 and ids.count(smol.eos_id) == 5


def test_chatml_conversation_with_media(smol):
    conv = get_template("chatml", smol)
    upload(conv, video_upload_message("The video contains 2 frames sampled at 0.0, 1.0 seconds. "))
    ask(conv, "What happens?")
    prompt = chat_prompt(conv)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\n<Video><ImageHere></Video> The video contains 2 frames sampled at 0.0, 1.0 seconds.  What happens?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    segs = prompt_segments(prompt, 1)
    ids = segment_token_ids(segs, smol)
    assert ids[0][0] != smol.bos_id or segs[0].startswith("<|im_start|>")  # no extra BOS for SmolLM2
    assert smol.decode(ids[0]) + "<ImageHere>" + smol.decode(ids[1]) == prompt
    assert stop_token_sequences("chatml", smol) == [[smol.eos_id]]


def test_chat_instruction_sample(smol):
    """Ours (not upstream): only assistant replies (+ <|im_end|>) are targets."""
    turns = [{"from": who, "value": text}
             for who, text in [("human", "<image>\nWhat is it?"), ("gpt", "A cat."), ("human", "Sure?"), ("gpt", "Yes.")]]
    ids, labels = instruction_sample(turns, "chatml", smol, num_query_tokens=3, media="image")
    ids2, labels2 = chat_instruction_sample(turns, smol, num_query_tokens=3, media="image")
    assert ids.tolist() == ids2.tolist() and labels.tolist() == labels2.tolist()
    assert (ids == smol.image_placeholder_id).sum() == 3
    kept = [int(i) for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert smol.decode(kept) == "A cat.<|im_end|>Yes.<|im_end|>"
    text = smol.decode(ids.tolist())
    assert "<|im_start|>user\n<Image><ImageHere><ImageHere><ImageHere></Image>\nWhat is it?<|im_end|>" in text
    # an explicit system message replaces the template default
    ids3, _ = chat_instruction_sample(turns, smol, 3, "image", system="Be brief.")
    assert smol.decode(ids3.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert np.all((labels == IGNORE_INDEX) | (labels == ids))


def test_save_load_round_trip(smol, tmp_path):
    smol.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.family == "hf"
    for attr in ("bos_id", "eos_id", "pad_id", "unk_id", "base_vocab_size", "image_placeholder_id", "audio_placeholder_id", "adds_bos", "chat_template"):
        assert getattr(again, attr) == getattr(smol, attr), attr
    s = "<|im_start|>user\n<Image><ImageHere></Image> ünïcode<|im_end|>"
    assert again.encode(s) == smol.encode(s)


def test_bad_gguf(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"NOPE" + b"\x00" * 64)
    with pytest.raises(TokenizerError) as e:
        read_gguf_metadata(p)
    assert str(p) in str(e.value) and "GGUF" in str(e.value)


@pytest.mark.parametrize("clean", [True, False])
def test_decode_clean_up_matches_transformers(smol, smollm2_path, clean):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    text = "Hello , world . It 's fine ! Is n't it ? I 'm here ' quoted ' we 've they 're"
    ids = smol.encode(text)
    assert smol.decode(ids, clean_up_tokenization_spaces=clean) == ref.decode(ids, clean_up_tokenization_spaces=clean)
    assert smol.clean_up_tokenization_spaces == bool(ref.clean_up_tokenization_spaces)  # carried from the source
    assert smol.decode(ids) == ref.decode(ids)
