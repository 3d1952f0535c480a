"""Conversation templates, chat prompts and their token segments (upstream.md §6)."""

import numpy as np
import pytest

from vllama_jax.text import conversation


# --- fixture chats -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,template,question", [
    ("chat_vicuna", "vicuna", "chat_question_vicuna"),
    ("chat_llama2", "llama_2", "chat_question_llama2"),
])
def test_fixture_chat_prompt_and_segments(tiny_tok, tiny_info, tiny_texts, tiny_inputs, key, template, question):
    """demo_audiovideo.py flow: video + audio upload (system ""), ask, render, split, tokenize."""
    conv = conversation.get_template(template)
    conversation.upload(conv, conversation.AUDIO_VIDEO_UPLOAD_MESSAGE, system=conversation.DEMO_SYSTEM_AUDIOVIDEO)
    conversation.ask(conv, tiny_texts[question])
    prompt = conversation.chat_prompt(conv)
    assert prompt == tiny_info[key]["prompt"]
    segs = conversation.prompt_segments(prompt, num_media=2)
    assert segs == tiny_info[key]["segments"]
    ids = conversation.segment_token_ids(segs, tiny_tok)
    for i in range(3):
        assert ids[i] == tiny_inputs[f"{key}.seg{i}_ids"][0].tolist(), i
    assert ids[0][0] == tiny_tok.bos_id and ids[1][0] != tiny_tok.bos_id and ids[2][0] != tiny_tok.bos_id
    assert conversation.stop_token_sequences(template) == tiny_info[key]["stop_words_ids"]


def test_audio_video_message_spaces(tiny_info):
    # 17 and 18 literal spaces (backslash continuations inside the upstream string literal)
    assert "<ImageHere>." + " " * 17 + "Close your ears" in conversation.AUDIO_VIDEO_UPLOAD_MESSAGE
    assert "</Video>." + " " * 18 + "Now answer" in conversation.AUDIO_VIDEO_UPLOAD_MESSAGE
    assert conversation.AUDIO_VIDEO_UPLOAD_MESSAGE in tiny_info["chat_vicuna"]["prompt"]


# --- rendering rules (hand-written) --------------------------------------------------------------------------------
@pytest.mark.parametrize("template,system,roles,messages,expected", [
    ("vicuna", "SYS", ("Human", "Assistant"), ("q1", "a1", "q2"),
     "SYS###Human: q1###Assistant: a1###Human: q2###Assistant:"),
    ("llama_2", "sys", ("USER", "ASSISTANT"), ("u1", "a1", "u2"),
     "[INST] <<SYS>>\nsys\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]"),
], ids=["vicuna", "llama_2"])
def test_two_turn_render(template, system, roles, messages, expected):
    """question, answer, question, pending answer (None)."""
    conv = conversation.get_template(template)
    conv.system = system
    for role, message in zip(roles * 2, (*messages, None)):
        conv.append_message(role, message)
    assert conv.render() == expected


def test_vicuna_render_empty_message():
    # an empty message renders like a pending one (upstream tests `if message:`)
    conv = conversation.get_template("vicuna")
    conv.append_message("Human", "")
    assert conv.render() == "###Human:"


def test_llama2_render():
    conv = conversation.get_template("llama_2")
    assert conv.system == conversation.LLAMA2_SYSTEM and conv.roles == ("USER", "ASSISTANT")
    train = conversation.get_template("llama_2_train")
    assert train.system == " "
    train.append_message("USER", "q")
    train.append_message("ASSISTANT", "a")
    assert train.render() == "[INST] <<SYS>>\n \n<</SYS>>\n\nq [/INST] a </s>"
    bad = conversation.get_template("llama_2")
    bad.append_message("ASSISTANT", "x")
    with pytest.raises(ValueError):
        bad.render()


def test_templates_table():
    templates = conversation.TEMPLATES
    assert templates["vicuna"].sep_style == conversation.SeparatorStyle.SINGLE and templates["vicuna"].sep == "###"
    assert templates["vicuna"].system == "" and templates["vicuna_train"].system == ""
    assert (templates["llama_2"].sep, templates["llama_2"].sep2) == ("<s>", "</s>")
    assert conversation.get_template("llama2").name == "llama_2"
    assert conversation.get_template("llama_v2").name == "llama_2"
    # get_template returns copies
    a = conversation.get_template("vicuna")
    a.append_message("Human", "x")
    assert conversation.TEMPLATES["vicuna"].messages == [] and conversation.get_template("vicuna").messages == []
    b = a.copy()
    b.messages[0][1] = "changed"
    assert a.messages[0][1] == "x"
    with pytest.raises(KeyError):
        conversation.get_template("nope")


def test_ask_joining():
    # after a media message: joined with one space (two spaces when the message ends with a space)
    conv = conversation.get_template("vicuna")
    conversation.upload(conv, conversation.IMAGE_UPLOAD_MESSAGE, system=conversation.DEMO_SYSTEM_IMAGE)
    conversation.ask(conv, "What is it?")
    assert conv.messages == [["Human", "<Image><ImageHere></Image>  What is it?"]]
    assert conv.system == conversation.DEMO_SYSTEM_IMAGE
    # a second question after an answer starts a new message
    conv.append_message("Assistant", "A cat.")
    conversation.ask(conv, "Sure?")
    assert conv.messages[-1] == ["Human", "Sure?"]
    # no media in the last user message -> new message
    conv = conversation.get_template("vicuna")
    conv.append_message("Human", "plain")
    conversation.ask(conv, "q")
    assert len(conv.messages) == 2
    # the video message
    conv = conversation.get_template("vicuna")
    msg = conversation.frame_time_message([0, 10, 20], 20.0)
    conversation.upload(conv, conversation.video_upload_message(msg))
    conversation.ask(conv, "q")
    assert conv.messages[0][1] == "<Video><ImageHere></Video> The video contains 3 frames sampled at 0.0, 0.5, 1.0 seconds.  q"
    assert conversation.chat_prompt(conv).endswith("seconds.  q###Assistant:")


def test_frame_time_message():
    assert (conversation.frame_time_message([0, 37, 74], 29.97)
            == "The video contains 3 frames sampled at 0.0, 1.2, 2.5 seconds. ")
    assert conversation.video_upload_message("") == "<Video><ImageHere></Video> "


def test_prompt_segments_count_check():
    assert conversation.prompt_segments("a<ImageHere>b", 1) == ["a", "b"]
    assert conversation.prompt_segments("no media", 0) == ["no media"]
    with pytest.raises(ValueError):
        conversation.prompt_segments("a<ImageHere>b<ImageHere>", 1)


def test_segment_ids_multi_turn_llama2(tiny_tok):
    """The literal <s> of a later LLaMA-2 round becomes id 1 inside a segment; only segment 0 gets a BOS."""
    conv = conversation.get_template("llama_2")
    conversation.upload(conv, conversation.IMAGE_UPLOAD_MESSAGE)
    conversation.ask(conv, "q1")
    conv.append_message("ASSISTANT", "a1")
    conversation.ask(conv, "q2")
    segs = conversation.prompt_segments(conversation.chat_prompt(conv), 1)
    ids = conversation.segment_token_ids(segs, tiny_tok)
    assert ids[0][0] == 1 and ids[0].count(1) == 1
    assert ids[1].count(2) == 1 and ids[1].count(1) == 1  # "</s><s>"
    assert ids[1][ids[1].index(2) + 1] == 1


def test_stop_and_postprocess(tiny_tok):
    assert conversation.stop_token_sequences("vicuna") == [[835], [2277, 29937]]
    assert conversation.stop_token_sequences("llama_2") == [[2]]
    assert conversation.postprocess_answer("Assistant: a dog barks.###Human: x", "vicuna") == "a dog barks."
    assert conversation.postprocess_answer(" it is red. </s>ASSISTANT: more", "llama_2") == "it is red."
    assert conversation.postprocess_answer("ASSISTANT: it is red.</s>", "llama_2") == "it is red."
    # leading unk then BOS dropped, decoded with specials kept
    ids = [0, 1] + tiny_tok.encode("a dog") + [2]
    assert conversation.answer_from_ids(ids, tiny_tok, "llama_2") == "a dog"
    ids = np.array([1] + tiny_tok.encode("a dog###Human"))
    assert conversation.answer_from_ids(ids, tiny_tok, "vicuna") == "a dog"


def test_render_chat_template_chatml_fallback():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert (conversation.render_chat_template(None, msgs)
            == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")
    conv = conversation.get_template("chatml")  # no tokenizer -> built-in ChatML layout
    conv.system = "S"
    conversation.ask(conv, "hi")
    assert (conversation.chat_prompt(conv)
            == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert isinstance(conv, conversation.Conversation)
    assert conversation.postprocess_answer("yo<|im_end|>\n", "chatml") == "yo"
