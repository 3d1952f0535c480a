"""Tokenizer: exact transformers-4.28 slow LlamaTokenizer ids on the fixture SentencePiece model, save/load, errors."""
import json
import shutil
import warnings

import pytest

from vllama_jax.text import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def llama_dir(tiny_dir):
    return tiny_dir / "llama"


# --------------------------------------------------------------------------------------------------------------------
def test_fixture_special_ids(tiny_tok, tiny_info):
    sid = tiny_info["special_ids"]
    assert isinstance(tiny_tok, Tokenizer)
    assert tiny_tok.family == "llama_sp"
    assert (tiny_tok.bos_id, tiny_tok.eos_id, tiny_tok.pad_id, tiny_tok.unk_id) == (
        sid["bos"], sid["eos"], sid["pad(=unk)"], 0)
    assert tiny_tok.base_vocab_size == 512
    assert tiny_tok.image_placeholder_id == sid["image_patch_token_id"] == 512
    assert tiny_tok.audio_placeholder_id == sid["audio_patch_token_id"] == 513
    assert len(tiny_tok) == 514
    assert tiny_tok.adds_bos and not tiny_tok.adds_eos
    assert tiny_tok.instruct_pad_id == 0
    assert tiny_tok.chat_template is None


def test_load_variants(llama_dir, tiny_tok):
    """A folder, the model file itself, and a parent folder with a tokenizer/ sub-folder all give the same ids."""
    s = "###Human: <Video><ImageHere></Video> hi"
    assert load_tokenizer(llama_dir / "tokenizer.model").encode(s) == tiny_tok.encode(s)
    assert load_tokenizer(str(llama_dir)).encode(s) == tiny_tok.encode(s)


def test_encode_rules(tiny_tok):
    # BOS only on request
    assert tiny_tok.encode("hi", add_bos=True) == [1] + tiny_tok.encode("hi")
    assert tiny_tok.encode("hi", add_eos=True) == tiny_tok.encode("hi") + [2]
    assert tiny_tok.encode("") == [] and tiny_tok.encode("", add_bos=True) == [1]
    # literal specials -> ids, no whitespace stripping around them, each chunk gets the dummy prefix
    assert tiny_tok.encode("a </s><s>b") == tiny_tok.encode("a ") + [2, 1] + tiny_tok.encode("b")
    assert tiny_tok.encode("x <unk> y") == tiny_tok.encode("x ") + [0] + tiny_tok.encode(" y")
    # whitespace around placeholders is stripped on both sides
    assert tiny_tok.encode("a \n <ImageHere>  b") == tiny_tok.encode("a") + [512] + tiny_tok.encode("b")
    assert tiny_tok.encode(" <ImageHere> <AudioHere> ") == [512, 513]
    assert tiny_tok.encode("<ImageHere>" * 3) == [512] * 3
    # chunks are encoded independently: "b" after a placeholder is "▁b", the same as at the start
    assert tiny_tok.encode("a<ImageHere>b")[-1] == tiny_tok.encode("b")[0]
    assert tiny_tok.tokenize("a<ImageHere>b") == ["▁a", IMAGE_PLACEHOLDER, "▁b"]


def test_fixture_decoded_inputs(tiny_tok, tiny_info, tiny_inputs):
    """decode() reproduces transformers 4.28 LlamaTokenizer.decode on the stage-2 batches (incl. its extra spaces)."""
    for key in ("stage2_vicuna", "stage2_llama2"):
        ids, mask = tiny_inputs[f"{key}.input_ids"], tiny_inputs[f"{key}.attention_mask"]
        for r, expected in enumerate(tiny_info[key]["decoded_input"]):
            row = ids[r][mask[r].astype(bool)]
            assert tiny_tok.decode(row) == expected
            assert tiny_tok.decode(row.tolist()) == expected


def test_decode_round_trip_and_skip(tiny_tok):
    for s in ["Hello world", "ünïcode 你好 🤖", "12345 67.89", "a\n\nb\tc", "###Assistant: ok"]:
        assert tiny_tok.decode(tiny_tok.encode(s)) == s
        assert tiny_tok.decode(tiny_tok.encode(s, add_bos=True, add_eos=True), skip_special_tokens=True) == s
    assert tiny_tok.decode([1] + tiny_tok.encode("hi")) == "<s>hi"
    # placeholders are added (not special) tokens: kept even when skipping, joined with single spaces
    assert tiny_tok.decode(tiny_tok.encode("a<ImageHere>b"), skip_special_tokens=True) == "a <ImageHere> b"


# --- comparison with transformers' slow tokenizer --------------------------------------------------------------------
COMPARE_STRINGS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing  ",
    " ",
    "\n\nx",
    "12345 67.89 007",
    "ünïcode 你好 🤖 naïve café ß",
    "tab\there",
    "###Human: <Video><ImageHere><ImageHere></Video> hi###Assistant: ok\n###",
    "[INST] <<SYS>>\n \n<</SYS>>\n\nq [/INST] a </s><s>[INST] q2 [/INST]",
    "a <ImageHere> b",
    "a<ImageHere>b",
    "x  <ImageHere>  <AudioHere>\n y",
    " <ImageHere> ",
    "<s>x</s>",
    " <s> x </s> ",
    "x <unk> y",
    "<</s>>",
    "<s<s>>",
    "The video contains 8 frames sampled at 0.0, 0.5 seconds. ",
]


@pytest.fixture(scope="module")
def slow_reference(llama_dir):
    """transformers' slow SentencePiece tokenizer in legacy mode, configured like 4.28's LlamaTokenizer + the
    upstream placeholders.

    transformers 5 has no slow ``LlamaTokenizer`` any more (``LlamaTokenizer(vocab_file=...)`` builds an empty BPE);
    its ``SentencePieceBackend(legacy=True)`` is the slow path: trie split on added tokens, then
    ``sp_model.encode(chunk)`` per chunk. In 4.28 ``add_tokens(["<ImageHere>"], special_tokens=True)`` registered a
    plain string whose neighbours' whitespace is stripped; in 5.x the equivalent is
    ``AddedToken(lstrip=True, rstrip=True)``. The special tokens ``<s>``/``</s>``/``<unk>`` strip nothing in both.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AddedToken
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        ref = SentencePieceBackend(
            vocab_file=str(llama_dir / "tokenizer.model"),
            legacy=True,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
        )
        ref.add_tokens(
            [AddedToken(t, lstrip=True, rstrip=True, special=True, normalized=False) for t in (IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER)]
        )
    assert ref.convert_tokens_to_ids([IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER]) == [512, 513]
    return ref


@pytest.mark.parametrize("text", COMPARE_STRINGS)
def test_matches_transformers_slow(tiny_tok, slow_reference, text):
    assert tiny_tok.encode(text) == slow_reference.encode(text, add_special_tokens=False)


def test_transformers5_fast_llama_differs(tiny_tok, llama_dir):
    """Documented: transformers 5's (fast, converted) ``LlamaTokenizer.from_pretrained(..., legacy=True)`` is NOT
    4.28-compatible: runs of leading spaces merge differently and placeholders keep their neighbouring spaces. We
    follow 4.28 (the fixture ids, checked in test_text_instruct / test_text_conversation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import LlamaTokenizer

        fast = LlamaTokenizer.from_pretrained(str(llama_dir), legacy=True)
        fast.add_tokens([IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER], special_tokens=True)
    same = ["Hello world", "12345 67.89", "ünïcode 你好", "a<ImageHere>b", "[INST] q [/INST] a </s><s>[INST]"]
    for s in same:
        assert tiny_tok.encode(s) == fast.encode(s, add_special_tokens=False)
    assert tiny_tok.encode("a <ImageHere> b") == [283, 512, 346]
    assert fast.encode("a <ImageHere> b", add_special_tokens=False) != [283, 512, 346]


# --- save / load ----------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tiny_tok, tmp_path):
    tiny_tok.save(tmp_path / "tk")
    again = load_tokenizer(tmp_path / "tk")
    assert again.family == "llama_sp"
    for attr in ("bos_id", "eos_id", "pad_id", "unk_id", "base_vocab_size", "image_placeholder_id", "audio_placeholder_id", "adds_bos"):
        assert getattr(again, attr) == getattr(tiny_tok, attr), attr
    for s in COMPARE_STRINGS:
        assert again.encode(s) == tiny_tok.encode(s)
    # a model folder with the tokenizer in tokenizer/ (as convert_weights writes it)
    model_dir = tmp_path / "model"
    tiny_tok.save(model_dir / "tokenizer")
    assert load_tokenizer(model_dir).encode("a<ImageHere>b") == tiny_tok.encode("a<ImageHere>b")


def test_added_tokens_json(llama_dir, tmp_path):
    """Vicuna v0 style: '[PAD]' appended at id 512 -> placeholders move to 513/514; the pad token strips nothing;
    upstream's instruction datasets still pad with unk (0)."""
    d = tmp_path / "vicuna"
    d.mkdir()
    shutil.copy(llama_dir / "tokenizer.model", d / "tokenizer.model")
    (d / "added_tokens.json").write_text(json.dumps({"[PAD]": 512}))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}))
    t = load_tokenizer(d)
    assert t.base_vocab_size == 513
    assert (t.image_placeholder_id, t.audio_placeholder_id) == (513, 514)
    assert t.pad_id == 512 and t.instruct_pad_id == 0
    assert t.encode("a [PAD] b") == t.encode("a ") + [512] + t.encode(" b")
    assert t.encode("a <ImageHere> b") == t.encode("a") + [513] + t.encode("b")
    assert t.decode([512]) == "[PAD]"


# --- errors ---------------------------------------------------------------------------------------------------------
def test_error_missing(tmp_path):
    p = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(p)
    assert str(p) in str(e.value) and "no such file" in str(e.value)
    assert e.value.path == str(p)


def test_error_not_a_tokenizer(tmp_path, llama_dir):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01 this is not a sentencepiece model \xff" * 10)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(junk)
    assert str(junk) in str(e.value) and "SentencePiece" in str(e.value)
    # the same file found through its folder
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(junk) in str(e.value)
    # a JSON file that is not a tokenizer
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(llama_dir / "config.json")
    assert "config.json" in str(e.value) and "not a tokenizer" in str(e.value)
    # a weights file
    weights = next(llama_dir.glob("*.safetensors"))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(weights)
    assert weights.name in str(e.value)


def test_error_empty_dir_and_bad_gguf(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(empty)
    assert str(empty) in str(e.value) and "no tokenizer found" in str(e.value)
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01")  # truncated header
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(bad)
    assert str(bad) in str(e.value)


# --- a LLaMA SentencePiece vocabulary stored in a GGUF ---------------------------------------------------------------
def _write_llama_gguf(model_file, out, pad_id=None):
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if pad_id is not None:
        w.add_pad_token_id(pad_id)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.add_chat_template("{{ messages[0]['content'] }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_with_llama_vocab_is_exact(llama_dir, tiny_tok, tmp_path):
    """A GGUF holding a SentencePiece ("llama") vocabulary is rebuilt into a SentencePiece model, so it gets the
    same 4.28 ids as tokenizer.model (not transformers' converted BPE)."""
    path = tmp_path / "tiny-llama.gguf"
    _write_llama_gguf(llama_dir / "tokenizer.model", path)
    g = load_tokenizer(path)
    assert g.family == "llama_sp"
    assert (g.bos_id, g.eos_id, g.unk_id, g.pad_id) == (1, 2, 0, 0)
    assert (g.image_placeholder_id, g.audio_placeholder_id) == (512, 513)
    assert g.adds_bos and g.chat_template == "{{ messages[0]['content'] }}"
    for s in COMPARE_STRINGS:
        assert g.encode(s) == tiny_tok.encode(s), s
        assert g.decode(tiny_tok.encode(s, add_bos=True)) == tiny_tok.decode(tiny_tok.encode(s, add_bos=True))
    # and it saves as a plain HF LLaMA tokenizer folder
    g.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved" / "tokenizer.model")
    assert again.encode(COMPARE_STRINGS[9]) == tiny_tok.encode(COMPARE_STRINGS[9])
    assert again.chat_template == g.chat_template


# --- decode clean-up (transformers' clean_up_tokenization_spaces) -----------------------------------------------------
CLEAN_UP_TEXT = "Hello , world . It 's fine ! Is n't it ? I 'm here ' quoted ' we 've they 're done ."


@pytest.mark.parametrize("clean", [True, False])
def test_decode_clean_up_matches_transformers(tiny_tok, slow_reference, clean):
    ids = tiny_tok.encode(CLEAN_UP_TEXT)
    ours = tiny_tok.decode(ids, clean_up_tokenization_spaces=clean)
    assert ours == slow_reference.decode(ids, clean_up_tokenization_spaces=clean)
    assert (" ," in ours) is not clean  # the setting changes this text


def test_clean_up_setting_is_carried_from_the_source_files(tiny_tok, llama_dir, tmp_path):
    # the fixture's tokenizer_config.json says false (as LLaMA-2-chat's); 4.28's LlamaTokenizer defaults to false
    assert tiny_tok.clean_up_tokenization_spaces is False
    ids = tiny_tok.encode(CLEAN_UP_TEXT)
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["clean_up_tokenization_spaces"] = True
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    on = load_tokenizer(src)
    assert on.clean_up_tokenization_spaces is True
    assert on.decode(ids) == tiny_tok.decode(ids, clean_up_tokenization_spaces=True) != tiny_tok.decode(ids)
    on.save(tmp_path / "saved")  # what a converted model directory holds
    assert load_tokenizer(tmp_path / "saved").clean_up_tokenization_spaces is True
    del cfg["clean_up_tokenization_spaces"]
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(src).clean_up_tokenization_spaces is False
