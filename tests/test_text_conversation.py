"""Conversation templates, chat prompts and their token segments (upstream.md §6)."""
import json

import numpy as np
import pytest

from vllama_jax.text import (
    AUDIO_VIDEO_UPLOAD_MESSAGE,
    DEMO_SYSTEM_AUDIOVIDEO,
    DEMO_SYSTEM_IMAGE,
    IMAGE_UPLOAD_MESSAGE,
    TEMPLATES,
    Conversation,
    SeparatorStyle,
    answer_from_ids,
    ask,
    chat_prompt,
    frame_time_message,
    get_template,
    load_tokenizer,
    postprocess_answer,
    prompt_segments,
    render_chat_template,
    segment_token_ids,
    stop_token_sequences,
    upload,
    video_upload_message,
)
from vllama_jax.text.conversation import LLAMA2_SYSTEM


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir / "llama")


@pytest.fixture(scope="module")
def outputs(tiny_dir):
    return json.loads((tiny_dir / "outputs.json").read_text())


@pytest.fixture(scope="module")
def texts(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())["texts"]


@pytest.fixture(scope="module")
def inputs(tiny_dir):
    return dict(np.load(tiny_dir / "inputs.npz"))


# --- fixture chats -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,template,question", [
    ("chat_vicuna", "vicuna", "chat_question_vicuna"),
    ("chat_llama2", "llama_2", "chat_question_llama2"),
])
def test_fixture_chat_prompt_and_segments(tok, outputs, texts, inputs, key, template, question):
    """demo_audiovideo.py flow: video + audio upload (system ""), ask, render, split, tokenize."""
    conv = get_template(template)
    upload(conv, AUDIO_VIDEO_UPLOAD_MESSAGE, system=DEMO_SYSTEM_AUDIOVIDEO)
    ask(conv, texts[question])
    prompt = chat_prompt(conv)
    assert prompt == outputs[key]["prompt"]
    segs = prompt_segments(prompt, num_media=2)
    assert segs == outputs[key]["segments"]
    ids = segment_token_ids(segs, tok)
    for i in range(3):
        assert ids[i] == inputs[f"{key}.seg{i}_ids"][0].tolist(), i
    assert ids[0][0] == tok.bos_id and ids[1][0] != tok.bos_id and ids[2][0] != tok.bos_id
    assert stop_token_sequences(template) == outputs[key]["stop_words_ids"]


def test_audio_video_message_spaces(outputs):
    # 17 and 18 literal spaces (backslash continuations inside the upstream string literal)
    assert "<ImageHere>." + " " * 17 + "Close your ears" in AUDIO_VIDEO_UPLOAD_MESSAGE
    assert "</Video>." + " " * 18 + "Now answer" in AUDIO_VIDEO_UPLOAD_MESSAGE
    assert AUDIO_VIDEO_UPLOAD_MESSAGE in outputs["chat_vicuna"]["prompt"]


# --- rendering rules (hand-written) --------------------------------------------------------------------------------
def test_vicuna_render():
    conv = get_template("vicuna")
    conv.system = "SYS"
    conv.append_message("Human", "q1")
    conv.append_message("Assistant", "a1")
    conv.append_message("Human", "q2")
    conv.append_message("Assistant", None)
    assert conv.render() == "SYS###Human: q1###Assistant: a1###Human: q2###Assistant:"
    # an empty message renders like a pending one (upstream tests `if message:`)
    conv = get_template("vicuna")
    conv.append_message("Human", "")
    assert conv.render() == "###Human:"


def test_llama2_render():
    conv = get_template("llama_2")
    assert conv.system == LLAMA2_SYSTEM and conv.roles == ("USER", "ASSISTANT")
    conv.system = "sys"
    conv.append_message("USER", "u1")
    conv.append_message("ASSISTANT", "a1")
    conv.append_message("USER", "u2")
    conv.append_message("ASSISTANT", None)
    assert conv.render() == "[INST] <<SYS>>\nsys\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]"
    train = get_template("llama_2_train")
    assert train.system == " "
    train.append_message("USER", "q")
    train.append_message("ASSISTANT", "a")
    assert train.render() == "[INST] <<SYS>>\n \n<</SYS>>\n\nq [/INST] a </s>"
    bad = get_template("llama_2")
    bad.append_message("ASSISTANT", "x")
    with pytest.raises(ValueError):
        bad.render()


def test_templates_table():
    assert TEMPLATES["vicuna"].sep_style == SeparatorStyle.SINGLE and TEMPLATES["vicuna"].sep == "###"
    assert TEMPLATES["vicuna"].system == "" and TEMPLATES["vicuna_train"].system == ""
    assert (TEMPLATES["llama_2"].sep, TEMPLATES["llama_2"].sep2) == ("<s>", "</s>")
    assert get_template("llama2").name == "llama_2" and get_template("llama_v2").name == "llama_2"
    # get_template returns copies
    a = get_template("vicuna")
    a.append_message("Human", "x")
    assert TEMPLATES["vicuna"].messages == [] and get_template("vicuna").messages == []
    b = a.copy()
    b.messages[0][1] = "changed"
    assert a.messages[0][1] == "x"
    with pytest.raises(KeyError):
        get_template("nope")


def test_ask_joining():
    # after a media message: joined with one space (two spaces when the message ends with a space)
    conv = get_template("vicuna")
    upload(conv, IMAGE_UPLOAD_MESSAGE, system=DEMO_SYSTEM_IMAGE)
    ask(conv, "What is it?")
    assert conv.messages == [["Human", "<Image><ImageHere></Image>  What is it?"]]
    assert conv.system == DEMO_SYSTEM_IMAGE
    # a second question after an answer starts a new message
    conv.append_message("Assistant", "A cat.")
    ask(conv, "Sure?")
    assert conv.messages[-1] == ["Human", "Sure?"]
    # no media in the last user message -> new message
    conv = get_template("vicuna")
    conv.append_message("Human", "plain")
    ask(conv, "q")
    assert len(conv.messages) == 2
    # the video message
    conv = get_template("vicuna")
    msg = frame_time_message([0, 10, 20], 20.0)
    upload(conv, video_upload_message(msg))
    ask(conv, "q")
    assert conv.messages[0][1] == "<Video><ImageHere></Video> The video contains 3 frames sampled at 0.0, 0.5, 1.0 seconds.  q"
    assert chat_prompt(conv).endswith("seconds.  q###Assistant:")


def test_frame_time_message():
    assert frame_time_message([0, 37, 74], 29.97) == "The video contains 3 frames sampled at 0.0, 1.2, 2.5 seconds. "
    assert video_upload_message("") == "<Video><ImageHere></Video> "


def test_prompt_segments_count_check():
    assert prompt_segments("a<ImageHere>b", 1) == ["a", "b"]
    assert prompt_segments("no media", 0) == ["no media"]
    with pytest.raises(ValueError):
        prompt_segments("a<ImageHere>b<ImageHere>", 1)


def test_segment_ids_multi_turn_llama2(tok):
    """The literal <s> of a later LLaMA-2 round becomes id 1 inside a segment; only segment 0 gets a BOS."""
    conv = get_template("llama_2")
    upload(conv, IMAGE_UPLOAD_MESSAGE)
    ask(conv, "q1")
    conv.append_message("ASSISTANT", "a1")
    ask(conv, "q2")
    segs = prompt_segments(chat_prompt(conv), 1)
    ids = segment_token_ids(segs, tok)
    assert ids[0][0] == 1 and ids[0].count(1) == 1
    assert ids[1].count(2) == 1 and ids[1].count(1) == 1  # "</s><s>"
    assert ids[1][ids[1].index(2) + 1] == 1


def test_stop_and_postprocess(tok):
    assert stop_token_sequences("vicuna") == [[835], [2277, 29937]]
    assert stop_token_sequences("llama_2") == [[2]]
    assert postprocess_answer("Assistant: a dog barks.###Human: x", "vicuna") == "a dog barks."
    assert postprocess_answer(" it is red. </s>ASSISTANT: more", "llama_2") == "it is red."
    assert postprocess_answer("ASSISTANT: it is red.</s>", "llama_2") == "it is red."
    # leading unk then BOS dropped, decoded with specials kept
    ids = [0, 1] + tok.encode("a dog") + [2]
    assert answer_from_ids(ids, tok, "llama_2") == "a dog"
    assert answer_from_ids(np.array([1] + tok.encode("a dog###Human")), tok, "vicuna") == "a dog"


def test_render_chat_template_chatml_fallback():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_chat_template(None, msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    conv = get_template("chatml")  # no tokenizer -> built-in ChatML layout
    conv.system = "S"
    ask(conv, "hi")
    assert chat_prompt(conv) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(conv, Conversation)
    assert postprocess_answer("yo<|im_end|>\n", "chatml") == "yo"
