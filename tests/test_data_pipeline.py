"""grain pipeline: batch layouts and upstream text rules, host sharding, seeded shuffling, batch-level mixing,
read-time bad records."""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from vllama_jax.data import (BatchMixture, DataError, DatasetSpec, PipelineConfig, build_train_iterator,
                             synthetic)
from vllama_jax.data.prepare import prepare

TINY_VIDEO = {"num_frames": 10, "width": 64, "height": 64}


def config(tiny_dir: Path, **kw) -> PipelineConfig:
    base = dict(tokenizer=str(tiny_dir / "llama"), batch_size=2, num_frames=4, image_size=32, num_query_tokens=8,
                max_len=256, process_index=0, process_count=1)
    return PipelineConfig(**(base | kw))


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toy")
    sizes = {"webvid": 6, "cc_sbu_align": 7, "llava_instruct": 4, "webvid_instruct": 4}
    out = {}
    for name, n in sizes.items():
        synthetic.make_prepared(name, root / name, n, make={"video": TINY_VIDEO})
        out[name] = str(root / name / "prepared")
    return out


# ------------------------------------------------------------------------------------------------ caption batches
def test_caption_batch_equals_upstream_stage1(tmp_path: Path, tiny_dir: Path, tiny_inputs, tiny_texts):
    z, texts = tiny_inputs, tiny_texts
    src = synthetic.make_webvid(tmp_path / "src", 2, video=TINY_VIDEO)
    for k, cap in enumerate(texts["stage1_captions"]):  # the fixture captions (blip_caption leaves them as is)
        path = src.source / f"results_{k}.csv"
        rows = list(csv.DictReader(open(path)))
        rows[0]["name"] = cap
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    prepare("webvid", src.source, tmp_path / "out", media_dir=src.media_dir, progress=False)
    it = build_train_iterator([DatasetSpec(str(tmp_path / "out"))], config(tiny_dir, max_txt_len=32, end_sym="\n"))
    b = next(it)
    assert b["kind"] == "caption" and b["dataset"] == "webvid"
    assert b["frames"].shape == (2, 4, 32, 32, 3) and b["frames"].dtype == np.uint8  # normalised on the device
    order = np.argsort(b["example_id"])
    np.testing.assert_array_equal(b["text_ids"][order], z["stage1.text_ids"])  # caption + "\n", no BOS, 32
    np.testing.assert_array_equal(b["text_mask"][order], z["stage1.text_attention_mask"])
    assert b["text_ids"].dtype == np.int32 and b["example_id"].dtype == np.int64
    assert set(b) == {"frames", "text_ids", "text_mask", "example_id", "num_replaced", "replaced_ids", "kind", "dataset"}


def test_caption_processor_per_format(toy, tiny_dir: Path, tiny_tok):
    """WebVid captions go through blip_caption (lower-case, punctuation removed), cc_sbu_align ones stay raw."""
    from vllama_jax.text import blip_caption

    for name, process in (("webvid", blip_caption), ("cc_sbu_align", lambda c: c)):
        b = next(build_train_iterator([DatasetSpec(toy[name])], config(tiny_dir, max_txt_len=16, end_sym="###")))
        for row, eid in zip(b["text_ids"], b["example_id"]):
            want = tiny_tok.encode(process(synthetic.caption(int(eid))) + "###")[:16]
            np.testing.assert_array_equal(row[: len(want)], want)
            assert (row[len(want):] == tiny_tok.pad_id).all()
        if name == "cc_sbu_align":
            assert b["frames"].shape == (2, 1, 32, 32, 3)  # images: T = 1


# --------------------------------------------------------------------------------------------- instruction batches
def vicuna_by_hand(tok, turns: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """upstream.md §7.5, step by step."""
    header = "\n\n"
    strings = ["###" + ("Human" if t["from"] == "human" else "Assistant") + ": " + t["value"] + "\n" for t in turns]
    ids = tok.encode(header + "".join(strings) + "###", add_bos=True)[:max_len]
    labels = list(ids)
    n_header = len(tok.encode(header, add_bos=True))
    labels[:n_header] = [-100] * n_header
    cur = n_header
    for t, s in zip(turns, strings):
        n = sum(1 for i in tok.encode(s, add_bos=True) if i != 0)
        if t["from"] == "human":
            labels[cur + 2: cur + n] = [-100] * (n - 2)
        cur += n
    return ids, labels[: len(ids)]


def llama2_by_hand(tok, turns: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """upstream.md §7.6, step by step."""
    conv = "[INST] <<SYS>>\n \n<</SYS>>\n\n"
    for i, t in enumerate(turns):
        conv += (("" if i == 0 else "<s>[INST] ") + t["value"] + " [/INST]") if t["from"] == "human" \
            else " " + t["value"] + " </s>"
    ids = tok.encode(conv, add_bos=True)[:max_len]
    labels = list(ids)
    labels[0] = -100
    cur = 1
    for rou in conv.split("</s>"):
        if not rou:
            break
        parts = rou.split("[/INST] ")
        if len(parts) != 2:
            break
        instr_len = len(tok.encode(parts[0] + "[/INST] ", add_bos=True)) - 2
        labels[cur: cur + instr_len] = [-100] * len(labels[cur: cur + instr_len])
        cur += len(tok.encode(rou, add_bos=True))
    labels[cur:] = [-100] * len(labels[cur:])
    return ids, labels


@pytest.mark.parametrize("template", ["vicuna", "llama_v2"])
def test_videochat_instruction_sample_equals_upstream(tmp_path: Path, tiny_dir: Path, tiny_tok, tiny_inputs,
                                                      tiny_texts, template: str):
    """A VideoChat entry -> ids/labels: equal to the upstream dataset code's output (fixture) and to upstream.md §7.5/7.6
    worked by hand. The video (8 frames at 4 fps, 4 sampled) gives the fixture's frame-time message."""
    z, texts = tiny_inputs, tiny_texts
    qa = texts["stage2_conversations"][0]
    videos = tmp_path / "videos"
    synthetic.write_video(videos / "dog.mp4", num_frames=8, fps=4, width=64, height=64)
    (tmp_path / "vc.json").write_text(json.dumps([{"video": "dog.mp4", "QA": qa}]))
    prepare("webvid_instruct", tmp_path / "vc.json", tmp_path / "out", media_dir=videos, progress=False)
    cfg = config(tiny_dir, batch_size=1, template=template, max_len=512)
    b = next(build_train_iterator([DatasetSpec(str(tmp_path / "out"))], cfg))
    assert b["kind"] == "instruction" and b["frames"].shape == (1, 4, 32, 32, 3)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (1, 512)

    tag = "stage2_vicuna" if template == "vicuna" else "stage2_llama2"
    n = int(z[f"{tag}.attention_mask"][0].sum())
    np.testing.assert_array_equal(b["input_ids"][0, :n], z[f"{tag}.input_ids"][0, :n])
    np.testing.assert_array_equal(b["labels"][0, :n], z[f"{tag}.labels"][0, :n])
    np.testing.assert_array_equal(b["attention_mask"][0], np.arange(512) < n)
    assert (b["input_ids"][0, n:] == 0).all() and (b["labels"][0, n:] == -100).all()

    block = "<Video>" + "<ImageHere>" * 8 + "</Video> "
    msg = "The video contains 4 frames sampled at 0.0, 0.5, 1.0, 1.5 seconds. "
    turns = [t for p in qa for t in ({"from": "human", "value": p["q"]}, {"from": "gpt", "value": p["a"]})]
    turns[0]["value"] = block + msg + turns[0]["value"]
    by_hand = vicuna_by_hand if template == "vicuna" else llama2_by_hand
    ids, labels = by_hand(tiny_tok, turns, 512)
    assert len(ids) == n
    np.testing.assert_array_equal(b["input_ids"][0, :n], ids)
    np.testing.assert_array_equal(b["labels"][0, :n], labels)
    placeholders = np.flatnonzero(b["input_ids"][0] == tiny_tok.image_placeholder_id)
    assert len(placeholders) == 8 and placeholders[-1] - placeholders[0] == 7
    assert (b["labels"][0, placeholders] == -100).all()


@pytest.mark.parametrize("template", ["vicuna", "llama_v2"])
def test_llava_instruction_sample_by_hand(toy, tiny_dir: Path, tiny_tok, template: str):
    """LLaVA: every "<image>" becomes "<Image>" + N placeholders + "</Image>"; images are one frame."""
    cfg = config(tiny_dir, template=template, max_len=200)
    b = next(build_train_iterator([DatasetSpec(toy["llava_instruct"])], cfg))
    assert b["frames"].shape == (2, 1, 32, 32, 3) and b["input_ids"].shape == (2, 200)
    by_hand = vicuna_by_hand if template == "vicuna" else llama2_by_hand
    for row, eid in enumerate(b["example_id"]):
        turns = synthetic.conversation(int(eid), "image")
        turns[0]["value"] = turns[0]["value"].replace("<image>", "<Image>" + "<ImageHere>" * 8 + "</Image>")
        ids, labels = by_hand(tiny_tok, turns, 200)
        np.testing.assert_array_equal(b["input_ids"][row, : len(ids)], ids)
        np.testing.assert_array_equal(b["labels"][row, : len(ids)], labels)
        np.testing.assert_array_equal(b["attention_mask"][row], np.arange(200) < len(ids))


# ----------------------------------------------------------------------------------------- hosts, seeds, mixture
def test_two_hosts_see_disjoint_halves(toy, tiny_dir: Path):
    spec = [DatasetSpec(toy["cc_sbu_align"])]  # 7 records: host 0 gets 4, host 1 gets 3
    seen = []
    for host, n in ((0, 4), (1, 3)):
        it = build_train_iterator(spec, config(tiny_dir, batch_size=1, process_index=host, process_count=2))
        epoch1 = [int(b["example_id"][0]) for b in take(it, n)]
        epoch2 = [int(b["example_id"][0]) for b in take(it, n)]
        assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == n  # a full pass over its share each epoch
        seen.append(set(epoch1))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(7))


def test_shuffle_and_augmentation_deterministic_by_seed(toy, tiny_dir: Path):
    spec = [DatasetSpec(toy["webvid"])]

    def run(seed):
        bs = take(build_train_iterator(spec, config(tiny_dir, batch_size=1, seed=seed)), 12)
        return [int(b["example_id"][0]) for b in bs], np.stack([b["frames"] for b in bs])

    ids_a, frames_a = run(1)
    ids_b, frames_b = run(1)
    ids_c, _ = run(2)
    assert ids_a == ids_b and np.array_equal(frames_a, frames_b)
    assert ids_a != ids_c
    assert sorted(ids_a[:6]) == sorted(ids_a[6:]) == list(range(6)) and ids_a[:6] != ids_a[6:]  # reshuffled
    # train transforms: the same record in two epochs gets two different random crops
    first = {e: i for i, e in enumerate(ids_a[:6])}
    assert not np.array_equal(frames_a[first[0]], frames_a[6 + ids_a[6:].index(0)])


def test_batch_mixture_draws_whole_batches_by_sample_ratio():
    mix = BatchMixture([100, 24], seed=42, block=512)
    picks = [mix[i] for i in range(20000)]
    ks = np.array([k for k, _ in picks])
    assert abs(ks.mean() - 24 / 124) < 0.01  # P(dataset 1) = 24 / (100 + 24)
    for k in (0, 1):  # each dataset's batches are consumed in order, none skipped or repeated
        assert [j for kk, j in picks if kk == k] == list(range(int((ks == k).sum())))
    fresh = pickle.loads(pickle.dumps(mix))  # random access from a fresh copy (a worker process) agrees
    assert [fresh[i] for i in (19999, 5, 12345)] == [picks[19999], picks[5], picks[12345]]
    assert [BatchMixture([1, 1, 1], seed=0)[i][0] for i in range(30)] != [0] * 30
    with pytest.raises(DataError):
        BatchMixture([1, -1], seed=0)


def test_mixture_of_caption_and_instruction_datasets(toy, tiny_dir: Path):
    specs = [DatasetSpec(toy["webvid"], 100), DatasetSpec(toy["cc_sbu_align"], 24),
             DatasetSpec(toy["llava_instruct"], 24)]
    batches = take(build_train_iterator(specs, config(tiny_dir, max_len=160)), 16)
    names = {b["dataset"] for b in batches}
    assert "webvid" in names and len(names) >= 2
    for b in batches:
        if b["kind"] == "caption":
            assert b["text_ids"].shape == (2, 32) and "input_ids" not in b
        else:
            assert b["dataset"] == "llava_instruct" and b["input_ids"].shape == (2, 160)
        assert b["frames"].shape[1] == (4 if b["dataset"] == "webvid" else 1)


def test_stage2_prompt_per_step_on_caption_batches_only(toy, tiny_dir: Path, tiny_tok):
    """Stage 2: every caption batch carries the prompt drawn for its step (upstream: one random.choice per batch;
    here from (seed, step), so a resumed run draws the same) as shared (1, n) rows; instruction batches none. The
    layouts are the specs of `data.batch`."""
    import random

    from vllama_jax.data import CAPTION, INSTRUCTION, caption_prompt_list
    from vllama_jax.text import prompt_wrap_ids

    prompts = ("<Image><ImageHere></Image> Describe this image in detail.",
               "<Image><ImageHere></Image> Take a look at this image and describe what you notice.")
    cfg = config(tiny_dir, max_len=160, seed=7, prompts=prompts, prompt_template="vicuna")
    full = caption_prompt_list(prompts, "vicuna")
    assert len(full) == 2 and all(p.startswith("###Human: ") for p in full)
    specs = [DatasetSpec(toy["cc_sbu_align"], 1), DatasetSpec(toy["llava_instruct"], 1)]
    batches = take(build_train_iterator(specs, cfg), 8)
    assert {b["kind"] for b in batches} == {"caption", "instruction"}
    for step, b in enumerate(batches):
        spec = CAPTION if b["kind"] == "caption" else INSTRUCTION
        assert set(spec.row_keys) <= set(b) and all(b[k].dtype == np.int32 for k in spec.row_keys[1:])
        if b["kind"] == "caption":
            before, after = prompt_wrap_ids(random.Random(7 * 1_000_003 + step).choice(full), tiny_tok)
            np.testing.assert_array_equal(b["prompt_before"], np.asarray([before], np.int32))
            np.testing.assert_array_equal(b["prompt_after"], np.asarray([after], np.int32))
        else:
            assert not set(CAPTION.shared_keys) & set(b)
    with pytest.raises(DataError, match="prompts"):
        build_train_iterator(specs, config(tiny_dir, prompts=("no placeholder",)))


def test_config_errors(toy, tiny_dir: Path, tmp_path: Path):
    with pytest.raises(DataError, match="used twice"):
        build_train_iterator([DatasetSpec(toy["webvid"]), DatasetSpec(toy["webvid"])], config(tiny_dir))
    with pytest.raises(DataError, match="not a prepared dataset"):
        build_train_iterator([DatasetSpec(str(tmp_path))], config(tiny_dir))
    with pytest.raises(DataError, match="process_index"):
        build_train_iterator([DatasetSpec(toy["webvid"])], config(tiny_dir, process_index=2, process_count=2))
    with pytest.raises(DataError, match="template"):
        build_train_iterator([DatasetSpec(toy["webvid"])], config(tiny_dir, template="alpaca"))
    with pytest.raises(DataError, match="batch_size"):
        build_train_iterator([DatasetSpec(toy["webvid"])], config(tiny_dir, batch_size=0))


# ------------------------------------------------------------------------------------------- read-time bad records
def test_bad_records_at_read_time_are_replaced_and_counted(tmp_path: Path, tiny_dir: Path):
    """Media that went bad after prepare (checking skipped): replaced deterministically, counted, never dropped."""
    src = synthetic.make_jsonl(tmp_path / "src", 6, media="video", video=TINY_VIDEO)
    prepare("jsonl", src.source, tmp_path / "out", progress=False, check_media=False)
    synthetic.write_corrupt(src.media_files[2])
    src.media_files[4].unlink()

    def run():
        it = build_train_iterator([DatasetSpec(str(tmp_path / "out"))], config(tiny_dir))
        bs = take(it, 6)  # two epochs of 6 records
        return it, [b["example_id"].tolist() for b in bs], [b["num_replaced"].tolist() for b in bs]

    it, ids, replaced = run()
    flat = [i for row in ids for i in row]
    assert len(flat) == 12 and not {2, 4} & set(flat)  # full batches, bad records never reach a batch
    assert it.stats["replaced"] == sum(map(sum, replaced)) >= 4  # each bad record is drawn once per epoch
    assert it.get_state()["stats"] == it.stats
    _, ids2, replaced2 = run()
    assert (ids2, replaced2) == (ids, replaced)  # deterministic replacement


def test_all_bad_records_is_an_error(tmp_path: Path, tiny_dir: Path):
    src = synthetic.make_jsonl(tmp_path / "src", 2, media="image")
    prepare("jsonl", src.source, tmp_path / "out", progress=False, check_media=False)
    for f in src.media_files:
        f.unlink()
    it = build_train_iterator([DatasetSpec(str(tmp_path / "out"))], config(tiny_dir, max_retries=3))
    with pytest.raises(DataError, match="4 bad records in a row"):
        next(it)
