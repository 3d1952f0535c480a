"""Every upstream training-set format, read from a sample written by hand in the layout its authors publish.

The other data tests write their sources with the project's own `vllama_jax/data/synthetic.py`; a misunderstanding
shared by that writer and the readers would pass them. Here each source is a literal copied in form (not content)
from the published files, with the place that documents the layout cited next to it; only the media (a few
pixels of video or JPEG) are generated. Each sample goes through `prepare` (the readers, the media check, the
TFDS writer) and back through `read_records`, and the exact records the published layout implies are asserted:
caption, turns, media path, source id. Two samples also go through the training pipeline to pin the read-time text
rules on published text (WebVid's `blip_caption`, LLaVA's `<image>` at the end of a turn).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_data_pipeline import vicuna_by_hand
from vllama_jax.data import DataError, DatasetSpec, PipelineConfig, build_train_iterator, read_records
from vllama_jax.data.prepare import prepare
from vllama_jax.data.records import Record, Turn
from vllama_jax.data.synthetic import image_bytes, write_image, write_video

TINY_VIDEO = {"num_frames": 10, "width": 64, "height": 64}


def prepared(dataset: str, source: Path, out: Path, media_dir: Path | None = None) -> list[Record]:
    """prepare -> read_records, in listing order; every entry must have been written (no bad ones)."""
    summary = prepare(dataset, source, out, media_dir=media_dir, progress=False, workers=0)
    assert summary.bad == 0, (out / "bad_records.jsonl").read_text()
    recs = read_records(out)
    return sorted((recs[i] for i in range(len(recs))), key=lambda r: r.example_id)


def turns(*pairs: tuple[str, str]) -> tuple[Turn, ...]:
    return tuple(Turn(role, value) for role, value in pairs)


# ------------------------------------------------------------------------------------------------------------ WebVid
# m-bain/webvid (https://github.com/m-bain/webvid, `results_2M_train.csv` / `results_2M_val.csv`): one CSV per split,
# header `videoid,contentUrl,duration,page_dir,name`, captions quoted when they hold a comma or a quote (RFC 4180,
# as pandas writes them); its download.py stores each clip at `{page_dir}/{videoid}.mp4`. Upstream
# `video_llama/datasets/datasets/webvid_datasets.py` concatenates every *.csv of `ann_root` (pd.read_csv), takes
# `name.strip()` through `blip_caption` and opens `vis_root/{page_dir}/{videoid}.mp4`.
WEBVID_TRAIN_CSV = (
    "videoid,contentUrl,duration,page_dir,name\n"
    "1066667845,https://ak.picdn.net/shutterstock/videos/1066667845/preview/stock-footage-aerial-view-of-a-winter"
    "-forest.mp4,PT00H00M14S,129651_129700,Aerial view of a winter forest.\n"
    "31353427,https://ak.picdn.net/shutterstock/videos/31353427/preview/stock-footage-merida-mexico.mp4,PT00H00M21S,"
    "035251_035300,\"Merida, mexico - may 23, 2017: tourists are walking on a roadside near catholic church in the "
    "street of mexico at sunny summer day.\"\n"
)
# the val split as a second file, with CRLF line ends, a doubled-quote caption and a trailing space
WEBVID_VAL_CSV = (
    "videoid,contentUrl,duration,page_dir,name\r\n"
    "14781349,https://ak.picdn.net/shutterstock/videos/14781349/preview/stock-footage-happy-family.mp4,PT00H00M12S,"
    "017101_017150,\"A man says \"\"hello\"\" (to camera) \"\r\n"
)
WEBVID = [  # (source id, videoid, page_dir, raw name as read by the CSV parser, blip_caption of name.strip() by hand)
    ("results_2M_train.csv:2", "1066667845", "129651_129700", "Aerial view of a winter forest.",
     "aerial view of a winter forest"),
    ("results_2M_train.csv:3", "31353427", "035251_035300",
     "Merida, mexico - may 23, 2017: tourists are walking on a roadside near catholic church in the street of mexico "
     "at sunny summer day.",
     "merida, mexico - may 23, 2017 tourists are walking on a roadside near catholic church in the street of mexico "
     "at sunny summer day"),
    ("results_2M_val.csv:2", "14781349", "017101_017150", 'A man says "hello" (to camera) ',
     "a man says hello to camera"),
]


@pytest.fixture(scope="module")
def webvid(tmp_path_factory) -> tuple[Path, Path, list[Record]]:
    root = tmp_path_factory.mktemp("webvid")
    (root / "anno").mkdir()
    (root / "anno" / "results_2M_train.csv").write_bytes(WEBVID_TRAIN_CSV.encode())
    (root / "anno" / "results_2M_val.csv").write_bytes(WEBVID_VAL_CSV.encode())
    for k, (_, vid, page, _, _) in enumerate(WEBVID):
        write_video(root / "videos" / page / f"{vid}.mp4", seed=k, **TINY_VIDEO)
    return root, root / "prepared", prepared("webvid", root / "anno", root / "prepared", root / "videos")


def test_webvid_results_csv(webvid):
    root, _, recs = webvid
    assert [(r.source_id, r.media_type, r.media_path, r.caption, r.meta) for r in recs] == [
        (sid, "video", str(root / "videos" / page / f"{vid}.mp4"), name, {"videoid": vid, "page_dir": page})
        for sid, vid, page, name, _ in WEBVID]
    assert all(r.kind == "caption" and not r.media_bytes for r in recs)


def test_webvid_caption_reaches_the_batch_as_blip_caption(webvid, tiny_dir: Path, tiny_tok):
    """Read time: `blip_caption(name.strip()) + end_sym`, no BOS (upstream.md §7.3, §1.8 B.3), on published text."""
    _, out, _ = webvid
    cfg = PipelineConfig(tokenizer=str(tiny_dir / "llama"), batch_size=1, num_frames=4, image_size=32,
                         max_txt_len=64, end_sym="\n", process_index=0, process_count=1)
    it = build_train_iterator([DatasetSpec(str(out))], cfg)
    seen = {}
    for _ in range(3):  # batch size 1: the first epoch is a permutation of the 3 records
        b = next(it)
        seen[int(b["example_id"][0])] = b["text_ids"][0]
    assert sorted(seen) == [0, 1, 2]
    for i, (*_, cleaned) in enumerate(WEBVID):
        want = tiny_tok.encode(cleaned + "\n")[:64]
        np.testing.assert_array_equal(seen[i][: len(want)], want, err_msg=cleaned)
        assert (seen[i][len(want):] == tiny_tok.pad_id).all()


# ------------------------------------------------------------------------------------------------------ cc_sbu_align
# MiniGPT-4's stage-2 set (Vision-CAIR/MiniGPT-4 dataset/README_2_STAGE.md): `cc_sbu_align.zip` unpacks to
# `cc_sbu_align/filter_cap.json` + `cc_sbu_align/image/{2,3,...}.jpg`; filter_cap.json is
# {"annotations": [{"image_id": "2", "caption": ...}, ...]}. Upstream `CCSBUAlignBuilder` (image_text_pair_builder.py)
# reads `storage/filter_cap.json` and `storage/image/`, `CCSBUAlignDataset` opens `'{}.jpg'.format(image_id)` and
# keeps the caption raw (no blip_caption).
CC_SBU_ALIGN_JSON = """{
    "annotations": [
        {
            "image_id": "2",
            "caption": "The image shows a man fishing on a lawn next to a river with a bridge in the background. Trees can be seen on the other side of the river, and the sky is cloudy."
        },
        {
            "image_id": "11",
            "caption": "This image shows a red car parked in front of a small white house.\\nA dog sleeps on the porch."
        }
    ]
}"""


def test_cc_sbu_align_folder(tmp_path: Path):
    src = tmp_path / "cc_sbu_align"
    (src).mkdir()
    (src / "filter_cap.json").write_text(CC_SBU_ALIGN_JSON)
    for k, image_id in enumerate(("2", "11")):
        write_image(src / "image" / f"{image_id}.jpg", seed=k)
    anns = json.loads(CC_SBU_ALIGN_JSON)["annotations"]
    recs = prepared("cc_sbu_align", src, tmp_path / "out")  # --source is the unpacked folder, as `storage`
    assert [(r.source_id, r.media_type, r.media_path, r.caption, r.meta, r.kind) for r in recs] == [
        ("filter_cap.json[0]", "image", str(src / "image" / "2.jpg"), anns[0]["caption"], {"image_id": "2"}, "caption"),
        ("filter_cap.json[1]", "image", str(src / "image" / "11.jpg"), anns[1]["caption"], {"image_id": "11"},
         "caption"),
    ]
    assert "\n" in recs[1].caption  # the caption is kept exactly as written


# ------------------------------------------------------------------------------------------------------- LLaVA-CC3M
# liuhaotian/LLaVA-CC3M-Pretrain-595K as distributed (haotian-liu/LLaVA docs/Data.md): `chat.json` is a JSON list
# of {"id", "image": "GCC_train_<9 digits>.jpg", "conversations": [{"from": "human", "value": <instruction> with
# "<image>" before or after it}, {"from": "gpt", "value": <the CC3M caption>}]}; the images come in `images.zip`.
LLAVA_CC3M_CHAT_JSON = r"""[
  {
    "id": "GCC_train_002582585",
    "image": "GCC_train_002582585.jpg",
    "conversations": [
      {"from": "human", "value": "Provide a brief description of the given image.\n<image>"},
      {"from": "gpt", "value": "olive oil is a healthy ingredient used liberally ."}
    ]
  },
  {
    "id": "GCC_train_002061040",
    "image": "GCC_train_002061040.jpg",
    "conversations": [
      {"from": "human", "value": "<image>\nWrite a terse but informative summary of the picture."},
      {"from": "gpt", "value": "a man walks along the beach at sunset"}
    ]
  }
]"""


@pytest.mark.parametrize("where", ["images/ next to chat.json", "--media-dir"])
def test_llava_cc3m_chat_json(tmp_path: Path, where: str):
    src = tmp_path / "LLaVA-CC3M-Pretrain-595K"
    src.mkdir()
    (src / "chat.json").write_text(LLAVA_CC3M_CHAT_JSON)
    images = src / "images" if where.startswith("images") else tmp_path / "unzipped"
    entries = json.loads(LLAVA_CC3M_CHAT_JSON)
    for k, e in enumerate(entries):
        write_image(images / e["image"], seed=k)
    recs = prepared("llava_cc3m", src, tmp_path / "out", media_dir=None if where.startswith("images") else images)
    assert [(r.source_id, r.media_type, r.media_path, r.caption, r.meta, r.kind) for r in recs] == [
        (f"chat.json[{k}]", "image", str(images / e["image"]), e["conversations"][1]["value"],
         {"image": e["image"], "id": e["id"]}, "caption") for k, e in enumerate(entries)]


# ---------------------------------------------------------------------------------------- CC-SBU / LAION webdataset
# MiniGPT-4 stage 1 (Vision-CAIR/MiniGPT-4 dataset/README_1_STAGE.md, download_cc_sbu.sh / download_laion.sh) runs
# img2dataset with `--output_format webdataset`: shards `00000.tar`, `00001.tar`, ... with `00000.parquet` and
# `00000_stats.json` beside them. img2dataset's WebDatasetSampleWriter (rom1504/img2dataset writer.py) writes each
# sample through webdataset's TarWriter as `{key}.jpg`, `{key}.json` (json.dumps(meta, indent=4): the input row's
# `caption` and `url`, then `key`, `status`, ... ) and `{key}.txt` (the caption), members in sorted extension order,
# keys "%09d"-numbered, with gaps where a download failed. Upstream `CCSBUDataset` / `LaionDataset` read the shards
# with `wds.to_tuple("jpg", "json")` and caption `json["caption"]` through `blip_caption`; the upstream dataset
# configs point `storage` at a brace list, `/path/to/cc_sbu_dataset/{00000..00001}.tar`.
SHARDS = {  # shard -> [(key, caption)]
    "00000.tar": [("000000000", "a white and black cat laying on a couch"),
                  ("000000002", "Olive oil, garlic & herbs: a simple recipe!")],  # 000000001 failed to download
    "00001.tar": [("000010000", "people walking on a city street at night")],
}


def img2dataset_meta(key: str, caption: str) -> str:
    meta = {"caption": caption, "url": f"http://example.com/images/{key}.jpg", "key": key, "status": "success",
            "error_message": None, "width": 64, "height": 48, "original_width": 640, "original_height": 480,
            "exif": "{}", "sha256": "0" * 64}
    return json.dumps(meta, indent=4)


def write_img2dataset_shards(folder: Path) -> dict[str, bytes]:
    """The shards as img2dataset writes them; returns {key: jpg bytes}."""
    folder.mkdir(parents=True)
    jpgs = {}
    for s, (shard, samples) in enumerate(SHARDS.items()):
        with tarfile.open(folder / shard, "w") as tar:
            for k, (key, caption) in enumerate(samples):
                jpgs[key] = image_bytes(seed=10 * s + k)
                members = {"jpg": jpgs[key], "json": img2dataset_meta(key, caption).encode(), "txt": caption.encode()}
                for ext in sorted(members):  # webdataset TarWriter: sorted(sample keys)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.uname, info.gname = len(members[ext]), 0o444, "bigdata", "bigdata"
                    tar.addfile(info, io.BytesIO(members[ext]))
        stem = shard.removesuffix(".tar")
        (folder / f"{stem}.parquet").write_bytes(b"PAR1 not read by the reader PAR1")
        (folder / f"{stem}_stats.json").write_text(json.dumps({"count": len(samples) + 1, "successes": len(samples)}))
    return jpgs


def expected_webdataset(folder: Path) -> list[tuple]:
    return [(f"{shard}#{key}", "image", f"{folder / shard}#{key}.jpg", caption, {"key": key}, "caption")
            for shard, samples in SHARDS.items() for key, caption in samples]


@pytest.mark.parametrize("dataset", ["cc_sbu", "laion"])
def test_img2dataset_webdataset_shards(tmp_path: Path, dataset: str):
    folder = tmp_path / f"{dataset}_dataset"
    jpgs = write_img2dataset_shards(folder)
    recs = prepared(dataset, folder, tmp_path / "out")
    assert [(r.source_id, r.media_type, r.media_path, r.caption, r.meta, r.kind) for r in recs] == \
        expected_webdataset(folder)
    assert [r.media_bytes for r in recs] == [jpgs[r.meta["key"]] for r in recs]  # the image out of the tar


def test_webdataset_storage_brace_list_as_in_the_upstream_config(tmp_path: Path):
    """`storage: /path/to/cc_sbu_dataset/{00000..00001}.tar` (upstream configs/datasets/cc_sbu/defaults.yaml) names
    the shards as webdataset's brace expansion does; a shard the list names but the disk lacks is an error."""
    folder = tmp_path / "cc_sbu_dataset"
    write_img2dataset_shards(folder)
    recs = prepared("cc_sbu", Path(f"{folder}/{{00000..00001}}.tar"), tmp_path / "out")
    assert [(r.source_id, r.media_type, r.media_path, r.caption, r.meta, r.kind) for r in recs] == \
        expected_webdataset(folder)
    with pytest.raises(DataError, match="00002.tar"):
        prepare("cc_sbu", Path(f"{folder}/{{00000..00002}}.tar"), tmp_path / "out2", progress=False)


# ---------------------------------------------------------------------------------------------- LLaVA-Instruct-150K
# liuhaotian/LLaVA-Instruct-150K `llava_instruct_150k.json` (haotian-liu/LLaVA docs/Data.md): a JSON list of
# {"id": "<12-digit COCO id>", "image": "<12-digit COCO id>.jpg", "conversations": [{"from": "human"|"gpt",
# "value"}, ...]}, "<image>" in the first human turn, before or after the question. Upstream `Instruct_Dataset`
# (video_llama/datasets/datasets/llava_instruct_dataset.py) opens `vis_root/'COCO_train2014_' + image` (the COCO
# train2014 file name) and replaces every "<image>" by the image placeholder block.
LLAVA_INSTRUCT_JSON = r"""[
  {
    "id": "000000033471",
    "image": "000000033471.jpg",
    "conversations": [
      {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
      {"from": "gpt", "value": "The bus in the image is white and red."},
      {"from": "human", "value": "What feature can be seen on the back of the bus?"},
      {"from": "gpt", "value": "The back of the bus features an advertisement."}
    ]
  },
  {
    "id": "000000052846",
    "image": "000000052846.jpg",
    "conversations": [
      {"from": "human", "value": "<image>\nWhere is the cat positioned in the image?"},
      {"from": "gpt", "value": "The cat is positioned on top of the back of the couch in the living room."}
    ]
  }
]"""


@pytest.fixture(scope="module")
def llava_instruct(tmp_path_factory) -> tuple[Path, Path, list[Record]]:
    root = tmp_path_factory.mktemp("llava")
    (root / "llava_instruct_150k.json").write_text(LLAVA_INSTRUCT_JSON)
    coco = root / "coco" / "train2014"
    for k, e in enumerate(json.loads(LLAVA_INSTRUCT_JSON)):
        write_image(coco / f"COCO_train2014_{e['image']}", seed=k)
    recs = prepared("llava_instruct", root / "llava_instruct_150k.json", root / "prepared", media_dir=coco)
    return coco, root / "prepared", recs


def test_llava_instruct_150k_json(llava_instruct):
    coco, _, recs = llava_instruct
    entries = json.loads(LLAVA_INSTRUCT_JSON)
    assert [(r.source_id, r.media_type, r.media_path, r.caption, r.meta, r.kind) for r in recs] == [
        (f"llava_instruct_150k.json[{k}]", "image", str(coco / f"COCO_train2014_{e['image']}"), "",
         {"image": e["image"], "id": e["id"]}, "instruction") for k, e in enumerate(entries)]
    assert recs[0].conversations == turns(
        ("human", "What are the colors of the bus in the image?\n<image>"),
        ("gpt", "The bus in the image is white and red."),
        ("human", "What feature can be seen on the back of the bus?"),
        ("gpt", "The back of the bus features an advertisement."))
    assert recs[1].conversations == turns(
        ("human", "<image>\nWhere is the cat positioned in the image?"),
        ("gpt", "The cat is positioned on top of the back of the couch in the living room."))


def test_llava_image_token_after_the_question_becomes_the_image_block_in_place(llava_instruct, tiny_dir: Path,
                                                                               tiny_tok):
    """Read time: "<image>" is replaced where it stands (here at the end of the question) by
    `<Image>` + N `<ImageHere>` + `</Image>` (upstream `preprocess_multimodal`), then upstream.md §7.5."""
    _, out, recs = llava_instruct
    cfg = PipelineConfig(tokenizer=str(tiny_dir / "llama"), batch_size=2, num_frames=4, image_size=32,
                         num_query_tokens=8, max_len=256, template="vicuna", process_index=0, process_count=1)
    b = next(build_train_iterator([DatasetSpec(str(out))], cfg))
    block = "<Image>" + "<ImageHere>" * 8 + "</Image>"
    for row, eid in enumerate(b["example_id"]):
        conv = [{"from": t.role, "value": t.value.replace("<image>", block)} for t in recs[int(eid)].conversations]
        ids, labels = vicuna_by_hand(tiny_tok, conv, 256)
        np.testing.assert_array_equal(b["input_ids"][row, : len(ids)], ids)
        np.testing.assert_array_equal(b["labels"][row, : len(ids)], labels)
        assert (b["input_ids"][row, len(ids):] == 0).all()
    first = b["input_ids"][list(b["example_id"]).index(0)]
    where = np.flatnonzero(first == tiny_tok.image_placeholder_id)
    question = tiny_tok.encode("What are the colors of the bus in the image?\n")
    assert len(where) == 8 and where[0] > len(question)  # the block comes after the question, as written


# ------------------------------------------------------------------------------------------- VideoChat-Instruct-11K
# `videochat_instruct_11k.json` (OpenGVLab, linked from Video-LLaMA's README): a JSON list of {"video":
# "<WebVid page_dir>/<videoid>.mp4", "QA": [{"q", "a"}, ...]} (the path format is what the community download
# scripts parse: "050951_051000/1022713978.mp4"). Upstream `Video_Instruct_Dataset` (video_instruct_dataset.py) opens
# `vis_root/video` and reads only `q` / `a` of each pair (`convert_source_vicuna_format`): the "i" (instruction) key
# that VideoChat2's later releases add to each pair is ignored.
VIDEOCHAT_JSON = r"""[
  {
    "video": "050951_051000/1022713978.mp4",
    "QA": [
      {"q": "What is the woman doing at the beginning of the video?", "a": "She is pouring coffee into a white cup."},
      {"q": "Does she drink it?", "a": "Yes, she takes a sip while looking out of the window."}
    ]
  },
  {
    "video": "000001_000050/1055745461.mp4",
    "QA": [{"i": "", "q": "Describe the following video in detail.", "a": "A drone flies over a green valley.\nA river runs through it."}]
  }
]"""


def test_videochat_instruct_11k_json(tmp_path: Path):
    (tmp_path / "videochat_instruct_11k.json").write_text(VIDEOCHAT_JSON)
    videos = tmp_path / "webvid_align" / "videos"
    entries = json.loads(VIDEOCHAT_JSON)
    for k, e in enumerate(entries):
        write_video(videos / e["video"], seed=k, **TINY_VIDEO)
    recs = prepared("webvid_instruct", tmp_path / "videochat_instruct_11k.json", tmp_path / "out", media_dir=videos)
    assert [(r.source_id, r.media_type, r.media_path, r.caption, r.meta, r.kind) for r in recs] == [
        (f"videochat_instruct_11k.json[{k}]", "video", str(videos / e["video"]), "", {"video": e["video"]},
         "instruction") for k, e in enumerate(entries)]
    assert recs[0].conversations == turns(
        ("human", "What is the woman doing at the beginning of the video?"),
        ("gpt", "She is pouring coffee into a white cup."),
        ("human", "Does she drink it?"),
        ("gpt", "Yes, she takes a sip while looking out of the window."))
    assert recs[1].conversations == turns(
        ("human", "Describe the following video in detail."),
        ("gpt", "A drone flies over a green valley.\nA river runs through it."))
