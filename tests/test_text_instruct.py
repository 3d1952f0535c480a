"""Caption text, caption-path tokens, instruction samples and labels (upstream.md §1.8, 6.3, 7.3, 7.5-7.7)."""
import re

import numpy as np
import pytest

from vllama_jax.text import Tokenizer, instruct


# --- fixture: caption path (path B) --------------------------------------------------------------------------------
def test_fixture_stage1(tiny_tok, tiny_info, tiny_texts, tiny_inputs):
    s1 = tiny_info["stage1"]
    assert [c + s1["end_sym"] for c in tiny_texts["stage1_captions"]] == s1["texts"]
    ids, mask = instruct.caption_tokens(tiny_texts["stage1_captions"], tiny_tok, s1["end_sym"], s1["max_txt_len"])
    np.testing.assert_array_equal(ids, tiny_inputs["stage1.text_ids"])
    np.testing.assert_array_equal(mask, tiny_inputs["stage1.text_attention_mask"])
    # caption 1 is truncated at 32 tokens (end_sym cut off)
    assert ids.shape == (2, 32) and mask[1].all()
    # static shapes
    ids64, mask64 = instruct.caption_tokens(tiny_texts["stage1_captions"], tiny_tok, s1["end_sym"], s1["max_txt_len"],
                                   pad_to=40)
    np.testing.assert_array_equal(ids64[:, :32], ids)
    assert (ids64[:, 32:] == tiny_tok.pad_id).all() and (mask64[:, 32:] == 0).all()
    with pytest.raises(ValueError):
        instruct.caption_tokens(tiny_texts["stage1_captions"], tiny_tok, s1["end_sym"], s1["max_txt_len"], pad_to=10)
    # targets: pads -> -100, prefix of -100 for BOS + media (here 8 video queries)
    tgt = instruct.caption_targets(ids, tiny_tok.pad_id, prefix_len=1 + 8)
    assert tgt.shape == (2, 41) and (tgt[:, :9] == instruct.IGNORE_INDEX).all()
    assert tgt[0, -1] == instruct.IGNORE_INDEX and tgt[1, -1] == ids[1, -1]


def test_fixture_stage1_prompt(tiny_tok, tiny_info, tiny_texts, tiny_inputs):
    sp = tiny_info["stage1_prompt"]
    tpl = tiny_texts["stage1_prompt_template"]
    assert tpl == instruct.STAGE2_PROMPT_TEMPLATE["vicuna"]
    prompt = instruct.stage2_prompt_list("vicuna")[tiny_texts["stage1_prompt_line"]]
    assert prompt == sp["prompt"]
    assert instruct.split_prompt(prompt) == (sp["p_before"], sp["p_after"])
    before, after = instruct.prompt_wrap_ids(prompt, tiny_tok)
    assert before == tiny_inputs["stage1_prompt.p_before_ids"][0].tolist()
    assert after == tiny_inputs["stage1_prompt.p_after_ids"][0].tolist()
    ids, mask = instruct.caption_tokens(tiny_texts["stage1_captions"], tiny_tok, sp["end_sym"], sp["max_txt_len"])
    np.testing.assert_array_equal(ids, tiny_inputs["stage1_prompt.text_ids"])
    np.testing.assert_array_equal(mask, tiny_inputs["stage1_prompt.text_attention_mask"])


def test_prompt_list():
    prompts = instruct.ALIGNMENT_PROMPTS
    assert len(prompts) == 4 and all(p.startswith("<Image><ImageHere></Image> ") for p in prompts)
    llama = instruct.stage2_prompt_list("llama_2")
    assert llama[0] == "[INST] <<SYS>>\n \n<</SYS>>\n\n<Image><ImageHere></Image> Describe this image in detail. [/INST] "
    assert instruct.stage2_prompt_list("vicuna")[3] == "###Human: <Image><ImageHere></Image> Could you describe the contents of this image for me? ###Assistant: "
    with pytest.raises(ValueError):
        instruct.split_prompt("no placeholder")


# --- fixture: instruction batches (path A) -------------------------------------------------------------------------
@pytest.mark.parametrize("key,template", [("stage2_vicuna", "vicuna"), ("stage2_llama2", "llama_2")])
def test_fixture_stage2_from_sources(tiny_tok, tiny_info, tiny_inputs, key, template):
    """The upstream sources (placeholders already inserted) through instruction_sample + collate."""
    samples = [instruct.instruction_sample(src[0], template, tiny_tok, num_query_tokens=8, media=None)
               for src in tiny_info[key]["sources"]]
    batch = instruct.collate_instruction(samples, pad_id=tiny_tok.instruct_pad_id)
    for k in ("input_ids", "labels", "attention_mask"):
        np.testing.assert_array_equal(batch[k], tiny_inputs[f"{key}.{k}"], err_msg=k)
    assert (batch["input_ids"] == tiny_tok.image_placeholder_id).sum(axis=1).tolist() == [8, 8]


@pytest.mark.parametrize("key,template", [("stage2_vicuna", "vicuna"), ("stage2_llama2", "llama_2")])
def test_fixture_stage2_from_qa(tiny_tok, tiny_info, tiny_texts, tiny_inputs, key, template):
    """From the raw VideoChat QA: videochat_turns + video placeholder insertion reproduce the sources and ids."""
    samples = []
    for qa, src in zip(tiny_texts["stage2_conversations"], tiny_info[key]["sources"]):
        msg = re.search(r"</Video> (The video contains .*? seconds\. )", src[0][0]["value"]).group(1)
        turns = instruct.videochat_turns(qa)
        assert instruct.insert_placeholders(turns, 8, "video", msg) == src[0]
        samples.append(instruct.instruction_sample(turns, template, tiny_tok, num_query_tokens=8, media="video",
                                                   video_msg=msg))
    batch = instruct.collate_instruction(samples, pad_id=0)
    for k in ("input_ids", "labels", "attention_mask"):
        np.testing.assert_array_equal(batch[k], tiny_inputs[f"{key}.{k}"], err_msg=k)


def _supervised_spans(tok, ids, labels):
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l != instruct.IGNORE_INDEX:
            assert l == i
            cur.append(int(i))
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_fixture_vicuna_mask_drift(tiny_tok, tiny_info):
    """upstream.md §12.12: the spans drift on the tiny vocabulary; reproduced, not fixed."""
    sources = tiny_info["stage2_vicuna"]["sources"]
    ids, labels = instruct.instruction_sample(sources[0][0], "vicuna", tiny_tok, 8, None)
    assert _supervised_spans(tiny_tok, ids, labels) == [
        "###",
        "#Assistant: The dog is barking loudly at someone.\n###Hu",
        "ssistant: Yes, it is inside a house.\n###",
    ]
    sources = tiny_info["stage2_llama2"]["sources"]
    ids, labels = instruct.instruction_sample(sources[0][0], "llama_2", tiny_tok, 8, None)
    # LLaMA-2: answers + the space before </s> + </s> (decode shows 4.28's space before a special token)
    assert _supervised_spans(tiny_tok, ids, labels) == [" The dog is barking loudly at someone. </s>",
                                                        " Yes, it is inside a house. </s>"]


# --- hand-worked masking examples with a character-level toy tokenizer ---------------------------------------------
class CharTokenizer(Tokenizer):
    """One token per character (id = ord(c)); ``<s>`` = 1, ``</s>`` = 2, ``<ImageHere>`` = 1000 split out.
    No merges, so every count in the masking rules can be done by hand."""

    family = "toy"
    bos_id, eos_id, pad_id, unk_id = 1, 2, 0, 0
    base_vocab_size, image_placeholder_id, audio_placeholder_id = 1000, 1000, 1001
    adds_bos, adds_eos = True, False
    SPECIAL = {"<s>": 1, "</s>": 2, "<ImageHere>": 1000}

    def encode(self, text, add_bos=False, add_eos=False):
        ids = [1] if add_bos else []
        for piece in re.split(r"(<s>|</s>|<ImageHere>)", text):
            ids += [self.SPECIAL[piece]] if piece in self.SPECIAL else [ord(c) for c in piece]
        return ids + ([2] if add_eos else [])

    def decode(self, ids, skip_special_tokens=False):
        inv = {v: k for k, v in self.SPECIAL.items()}
        return "".join(inv.get(i, chr(i)) for i in ids)


BOS = object()


def _expected(segments):
    """[(text or BOS, is_target)] -> (ids, labels) under CharTokenizer."""
    t = CharTokenizer()
    ids, labels = [], []
    for text, target in segments:
        part = [1] if text is BOS else t.encode(text)
        ids += part
        labels += part if target else [instruct.IGNORE_INDEX] * len(part)
    return ids, labels


ONE_TURN = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
TWO_TURNS = ONE_TURN + [{"from": "human", "value": "ok?"}, {"from": "gpt", "value": "sure"}]


def _check(turns, template, segments):
    ids, labels = instruct.instruction_sample(turns, template, CharTokenizer(), num_query_tokens=0, media=None)
    exp_ids, exp_labels = _expected(segments)
    assert ids.tolist() == exp_ids
    assert labels.tolist() == exp_labels


def test_vicuna_mask_one_turn_by_hand():
    # conversation = "\n\n" + "###Human: hi\n" + "###Assistant: yo\n" + "###"
    # counts (each with its own BOS): header 1+2 = 3, human 1+13 = 14, assistant 1+17 = 18.
    # labels[0:3] = -100 (BOS, \n, \n); human: labels[3+2 : 3+14] = -100; cursor 17; assistant: nothing masked.
    # Position p holds character p-1, so the extra BOS in each count shifts the spans by one character per turn
    # (with the real LLaMA vocabulary the isolated "▁###" is one token shorter than the in-context "##","#" and
    # the shift cancels; here it does not: the same drift as upstream.md §12.12).
    _check(
        ONE_TURN, "vicuna",
        [(BOS, False), ("\n\n", False), ("##", True), ("#Human: hi\n#", False), ("##Assistant: yo\n###", True)],
    )


def test_vicuna_mask_two_turns_by_hand():
    # counts: header 3, "###Human: hi\n" 14, "###Assistant: yo\n" 18, "###Human: ok?\n" 15, "###Assistant: sure\n" 20
    # masked: [0:3], [3+2 : 17] (human 1), [35+2 : 50] (human 2); cursor ends at 70 > 69 tokens.
    # char index = position - 1: positions 35, 36 -> "#", "H"; masked 37..49 -> "uman: ok?\n###".
    _check(
        TWO_TURNS, "vicuna",
        [
            (BOS, False), ("\n\n", False),
            ("##", True), ("#Human: hi\n#", False),
            ("##Assistant: yo\n###H", True), ("uman: ok?\n###", False),
            ("Assistant: sure\n###", True),
        ],
    )


def test_vicuna_mask_only_exact_human():
    # rendering lower-cases the speaker ("Human" -> "Human:"), masking compares with "human" exactly
    ids, labels = instruct.instruction_sample(
        [{"from": "Human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "vicuna", CharTokenizer(), 0, None
    )
    assert "###Human: hi" in CharTokenizer().decode(ids.tolist())
    assert (labels[3:] != instruct.IGNORE_INDEX).all()


def test_llama2_mask_one_turn_by_hand():
    # conversation = "[INST] <<SYS>>\n \n<</SYS>>\n\nhi [/INST] yo </s>"; labels[0] = -100, cursor 1.
    # round 0 = "[INST] ... hi [/INST] yo " -> round_len = 1 + len(round 0) (BOS stands in for "</s>");
    # instr = "[INST] ... hi [/INST] " -> instr_len = (1 + len(instr)) - 2 = everything up to "]" (the trailing
    # space is not subtracted per token here: the -2 removes BOS and one character).
    _check(
        ONE_TURN, "llama_2",
        [(BOS, False), ("[INST] <<SYS>>\n \n<</SYS>>\n\nhi [/INST]", False), (" yo </s>", True)],
    )


def test_llama2_mask_two_turns_by_hand():
    # round 1 = "<s>[INST] ok? [/INST] sure " starts at the "<s>" token; instr = "<s>[INST] ok? [/INST] " ->
    # (BOS + "<s>" + 19 chars) - 2 = "<s>" + "[INST] ok? [/INST]" masked; " sure " and "</s>" are targets.
    _check(
        TWO_TURNS, "llama_2",
        [
            (BOS, False), ("[INST] <<SYS>>\n \n<</SYS>>\n\nhi [/INST]", False), (" yo </s>", True),
            ("<s>[INST] ok? [/INST]", False), (" sure </s>", True),
        ],
    )


def test_llama2_drops_leading_gpt_turn_and_checks_alternation():
    turns = [{"from": "gpt", "value": "ignored"}] + ONE_TURN
    a = instruct.instruction_sample(turns, "llama_2", CharTokenizer(), 0, None)
    b = instruct.instruction_sample(turns[1:], "llama_2", CharTokenizer(), 0, None)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    with pytest.raises(ValueError):
        instruct.instruction_sample([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "llama_2",
                                    CharTokenizer(), 0, None)


def test_truncation_before_masking():
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x" * 100}]
    for template in ("vicuna", "llama_2"):
        ids, labels = instruct.instruction_sample(turns, template, CharTokenizer(), 0, None, max_len=40)
        full, full_labels = instruct.instruction_sample(turns, template, CharTokenizer(), 0, None)
        assert len(ids) == 40 and ids.tolist() == full.tolist()[:40]
        if template == "vicuna":
            assert labels.tolist() == full_labels.tolist()[:40]


def test_llava_image_placeholders(tiny_tok):
    turns = [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A cat."},
    ]
    out = instruct.insert_placeholders(turns, 4, "image")
    assert out[0]["value"] == "<Image>" + "<ImageHere>" * 4 + "</Image>\nWhat is shown?"
    assert turns[0]["value"].startswith("<image>")  # input untouched
    for template in ("vicuna", "llama_2"):
        ids, labels = instruct.instruction_sample(turns, template, tiny_tok, 4, "image")
        pos = np.nonzero(ids == tiny_tok.image_placeholder_id)[0]
        assert len(pos) == 4 and (np.diff(pos) == 1).all()  # contiguous run, as path A requires
        assert (labels[pos] == instruct.IGNORE_INDEX).all()
        assert ids[0] == tiny_tok.bos_id and labels[0] == instruct.IGNORE_INDEX


def test_collate():
    a = (np.array([1, 5, 6]), np.array([-100, 5, 6]))
    b = {"input_ids": [1, 7], "labels": [-100, 7]}
    out = instruct.collate_instruction([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert out["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    out = instruct.collate_instruction([a, b], pad_id=0, pad_to=5)
    assert out["input_ids"].shape == (2, 5) and out["attention_mask"][:, 3:].sum() == 0
    with pytest.raises(ValueError):
        instruct.collate_instruction([a], pad_id=0, pad_to=2)


def test_videochat_turns():
    assert instruct.videochat_turns([{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": "A2"}]) == [
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"},
    ]
    turns = instruct.insert_placeholders(instruct.videochat_turns([{"q": "Q", "a": "A"}]), 2, "video", "msg. ")
    assert turns[0]["value"] == "<Video><ImageHere><ImageHere></Video> msg. Q"


# --- blip_caption ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,expected", [
    ("A Dog, running! (fast)", "a dog, running fast"),
    ('He said: "hi"; ok~ #1 *star*', "he said hi ok 1 star"),
    ("  Spaces   everywhere.  \n", "spaces everywhere"),
    ("line\nbreak", "line\nbreak"),  # a single newline is not a run of 2+ whitespace
    ("tabs\t\tand\n\nlines\n", "tabs and lines"),
    ("Mr. Smith", "mr smith"),
    ("", ""),
])
def test_blip_caption(raw, expected):
    assert instruct.blip_caption(raw) == expected


def test_blip_caption_max_words():
    words = " ".join(f"w{i}" for i in range(60))
    assert instruct.blip_caption(words) == " ".join(f"w{i}" for i in range(50))
    assert instruct.blip_caption(words, max_words=3) == "w0 w1 w2"
