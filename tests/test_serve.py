"""`vllama-jax serve` on the embedded default, driven by the official `openai` client: media parts, streaming,
continuous batching (32 concurrent streams), a client killed mid-stream, the encoder and prefix caches, every bad
input refused with a 4xx, a drain on shutdown, and the web demo in a real headless Chromium.

Reference answers come from `VideoLLaMAChat` itself (upload / ask / answer, greedy): the server must give the
same text. Answers are short (MAX_TOKENS) to keep the module fast on a 2-core CPU.
"""
from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import require_or_skip
from tests.media_helpers import make_audio, make_video
from vllama_jax.inference import GenerationConfig, VideoLLaMAChat
from vllama_jax.serve import Server

MAX_TOKENS = 8
GREEDY = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def chat(smollm2_path) -> VideoLLaMAChat:
    return VideoLLaMAChat.embedded()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(d / "image.png")
    (d / "not_media.mp4").write_bytes(b"this is not a video" * 100)
    return {"video": make_video(d / "clip.mp4", n_frames=8, audio={"seconds": 1.0}),
            "audio": make_audio(d / "sound.wav", seconds=1.0), "image": d / "image.png", "dir": d,
            "not_media": d / "not_media.mp4"}


@pytest.fixture(scope="module")
def server(chat, media):
    srv = Server(chat, port=0, allowed_media_paths=[media["dir"]], max_batch=32, max_context=512,
                 max_tokens_default=MAX_TOKENS).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def reference(chat: VideoLLaMAChat, kind: str | None, path: Path | None, *questions: str) -> list[str]:
    """What `VideoLLaMAChat` answers (greedy), turn by turn."""
    if kind is None:
        chat.reset()
    else:
        getattr(chat, f"upload_{kind}")(path)
    answers = []
    for q in questions:
        chat.ask(q)
        answers.append(chat.answer(GREEDY))
    return answers


def media_part(kind: str, path: Path, as_file_url: bool = True) -> dict:
    if kind == "audio":
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                       "format": "wav"}}
    url = path.as_uri() if as_file_url else (
        f"data:{'image/png' if kind == 'image' else 'video/mp4'};base64,{base64.b64encode(path.read_bytes()).decode()}")
    return {"type": f"{kind}_url", f"{kind}_url": {"url": url}}


def user(text: str, part: dict | None = None) -> dict:
    return {"role": "user", "content": text if part is None else [part, {"type": "text", "text": text}]}


def ask(client: openai.OpenAI, messages: list[dict], stream: bool = False, **kw) -> tuple[str, object]:
    kw = {"model": "vllama-jax", "temperature": 0, "max_tokens": MAX_TOKENS, **kw}
    if not stream:
        r = client.chat.completions.create(messages=messages, **kw)
        return r.choices[0].message.content, r
    text, last = [], None
    for chunk in client.chat.completions.create(messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            text.append(c.delta.content or "")
        last = chunk
    return "".join(text), last


def call(server: Server, method: str, path: str, body: dict | str | None = None) -> tuple[int, dict | str]:
    """A plain HTTP call (stdlib): (status, parsed JSON or text)."""
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def metrics(server: Server) -> dict[str, float]:
    text = call(server, "GET", "/metrics")[1]
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(vllama_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


# ------------------------------------------------------------------------------------------------------------


def test_openai_client_text_video_image_audio(chat, server, client, media):
    """Each kind of content through the official client: streamed = not streamed = VideoLLaMAChat's answer."""
    models = client.models.list()
    assert [m.id for m in models.data] == [server.app.model_name]
    assert call(server, "GET", "/health") == (200, {"status": "ok"})
    cases = [("What is the capital of France?", None, None),
             ("What happens in the video?", "video", media_part("video", media["video"])),
             ("What is in the image?", "image", media_part("image", media["image"], as_file_url=False)),
             ("What do you hear?", "audio", media_part("audio", media["audio"]))]
    for question, kind, part in cases:
        [expected] = reference(chat, kind, media.get(kind), question)
        plain, resp = ask(client, [user(question, part)])
        streamed, last = ask(client, [user(question, part)], stream=True)
        assert plain == streamed == expected, (kind, plain, streamed, expected)
        assert resp.usage.prompt_tokens == last.usage.prompt_tokens > 10
        assert 1 <= resp.usage.completion_tokens == last.usage.completion_tokens <= MAX_TOKENS
        assert resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_sampling_seed_n_and_stop(client, media):
    """Sampling with a seed is reproducible whatever runs beside it; n choices; a stop string cuts the text."""
    msgs = [user("Tell me a story about a cat.")]
    a = client.chat.completions.create(model="m", messages=msgs, temperature=1.0, top_p=0.9, seed=7, n=3,
                                       max_tokens=MAX_TOKENS)
    b = client.chat.completions.create(model="m", messages=msgs, temperature=1.0, top_p=0.9, seed=7, n=3,
                                       max_tokens=MAX_TOKENS)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3 and a.usage.completion_tokens <= 3 * MAX_TOKENS
    full, _ = ask(client, msgs)
    word = full.split()[1]
    cut, resp = ask(client, msgs, stop=[word])
    assert word not in cut and full.startswith(cut) and resp.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_32_concurrent_streams_equal_their_answers_alone(server, client, media):
    """32 streaming clients at once: each completes with the greedy answer it gets alone, while the running batch
    holds many of them (the throughput figure is bench/serve.py's)."""
    video = media_part("video", media["video"])
    prompts = [[user("What happens in the video?", video)], [user("Describe the colours.", video)],
               [user("Say hello.")], [user("Name a fruit.")]]
    alone = [ask(client, p)[0] for p in prompts]
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], metrics(server).get("vllama_running_batch_size", 0))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: ask(client, prompts[i % 4], stream=True)[0], range(32)))
    finally:
        done.set()
        watcher.join()
    assert results == [alone[i % 4] for i in range(32)]
    assert peak[0] >= 8, peak


def test_client_killed_mid_stream_frees_its_row(server, client):
    before = metrics(server)
    body = {"model": "m", "messages": [user("Write a very long story about a dragon and a knight.")],
            "temperature": 0, "max_tokens": 400, "stream": True}
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    got = []
    while len(got) < 3:  # the role chunk and two pieces of text
        line = r.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data:"):
            got.append(line)
    conn.sock.close()  # the client dies: its socket closes mid-stream
    r.close()
    # the connection is closed: the row is dropped at the next step, far before 400 tokens
    deadline = time.monotonic() + 60
    while metrics(server).get("vllama_running_batch_size", 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = metrics(server)
    assert after["vllama_running_batch_size"] == 0
    assert after['vllama_requests_total{outcome="cancelled"}'] == before.get(
        'vllama_requests_total{outcome="cancelled"}', 0) + 1
    assert after["vllama_generation_tokens_total"] - before["vllama_generation_tokens_total"] < 100
    assert ask(client, [user("Say hello.")])[0]  # later requests are served


@pytest.mark.slow
def test_caches_prefill_only_new_tokens(chat, server, client, media, tmp_path):
    """A new video is encoded once; its first question reuses the system prompt every conversation starts with,
    a second question about it (past the media and the template's fixed text after them) and a follow-up turn
    prefill only their own tokens, and their answers are VideoLLaMAChat's (no cache there)."""
    clip = shutil.copy(make_video(tmp_path / "other.mp4", n_frames=8, width=64, audio={"seconds": 1.0}),
                       media["dir"] / "other.mp4")
    part = media_part("video", Path(clip))
    q1, q2, q3 = "What is shown?", "Is it daytime?", "Why?"
    ask(client, [user("Say hello.")])  # the system prompt's prefill is kept (whatever ran before)
    conv = chat.conversation([("user", "Say hello.", None)])
    head = chat.head_tokens(conv, chat.build_context(conv, []))
    assert head > 10  # ChatML's system prompt and the user tag
    m0 = metrics(server)
    a1, r1 = ask(client, [user(q1, part)])
    m1 = metrics(server)
    assert m1["vllama_encoder_cache_misses_total"] == m0["vllama_encoder_cache_misses_total"] + 1
    assert m1["vllama_prefix_cache_hits_total"] == m0["vllama_prefix_cache_hits_total"] + 1
    assert m1["vllama_prefill_tokens_total"] - m0["vllama_prefill_tokens_total"] == r1.usage.prompt_tokens - head

    a2, r2 = ask(client, [user(q2, part)])
    m2 = metrics(server)
    assert m2["vllama_encoder_cache_hits_total"] == m1["vllama_encoder_cache_hits_total"] + 1
    assert m2["vllama_prefix_cache_hits_total"] == m1["vllama_prefix_cache_hits_total"] + 1
    new2 = m2["vllama_prefill_tokens_total"] - m1["vllama_prefill_tokens_total"]
    assert 0 < new2 < r2.usage.prompt_tokens - 32  # the 32 video rows (and what precedes them) were reused

    a3, r3 = ask(client, [user(q1, part), {"role": "assistant", "content": a1}, user(q3)])
    m3 = metrics(server)
    assert m3["vllama_prefix_cache_hits_total"] == m2["vllama_prefix_cache_hits_total"] + 1
    assert m3["vllama_prefill_tokens_total"] - m2["vllama_prefill_tokens_total"] == \
        r3.usage.prompt_tokens - r1.usage.prompt_tokens  # only the answer and the new question

    assert [a1, a3] == reference(chat, "video", Path(clip), q1, q3)
    assert [a2] == reference(chat, "video", Path(clip), q2)
    chat.upload_video(Path(clip))
    chat.ask(q2)
    ctx = chat.context()
    tail = chat.tail_tokens(ctx, q2)
    assert ctx.segments[-1].startswith("</Video>") and tail > 5  # the closing tag and the fixed instruction
    assert new2 == len(ctx.segment_ids[-1]) - tail  # the question and the assistant tag, nothing before them


def test_bad_inputs_are_4xx_and_the_server_goes_on(server, media, tmp_path):
    outside = tmp_path / "outside.mp4"
    shutil.copy(media["video"], outside)
    long_text = "word " * 600
    ok = {"model": "m", "messages": [user("Say hello.")], "temperature": 0, "max_tokens": 2}
    cases = [
        ("{not json", 400, "invalid_json"),
        ({"model": "m"}, 400, "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "hologram", "hologram": {}}]}]}, 400,
         "unsupported_content_type"),
        ({**ok, "messages": [user("x", media_part("video", outside))]}, 403, "media_path_not_allowed"),
        ({**ok, "messages": [user("x", {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}})]},
         400, "invalid_url"),
        ({**ok, "messages": [user("x", media_part("video", media["not_media"]))]}, 400, "invalid_media"),
        ({**ok, "messages": [user(long_text)]}, 400, "context_length_exceeded"),
        ({**ok, "temperature": 7}, 400, "invalid_value"),
    ]
    before = metrics(server)
    for body, status, code in cases:
        got, reply = call(server, "POST", "/v1/chat/completions", body)
        assert got == status, (code, reply)
        assert reply["error"]["code"] == code and reply["error"]["message"], reply
        assert call(server, "POST", "/v1/chat/completions", ok)[0] == 200  # still serving
    server.scheduler.max_queue, saved = 0, server.scheduler.max_queue  # a full queue: 429 at once
    try:
        got, reply = call(server, "POST", "/v1/chat/completions", ok)
        assert got == 429 and reply["error"]["code"] == "queue_full"
    finally:
        server.scheduler.max_queue = saved
    after = metrics(server)
    for _, _, code in cases + [(None, 429, "queue_full")]:
        key = f'vllama_request_errors_total{{code="{code}"}}'
        assert after[key] > before.get(key, 0), key
    rejected = 'vllama_requests_total{outcome="rejected"}'
    assert after[rejected] - before.get(rejected, 0) == len(cases) + 1


def test_shutdown_drains_requests_in_flight(chat, media):
    """What Ctrl-C does (uvicorn's exit flag): open streams finish, then the server exits."""
    srv = Server(chat, port=0, max_batch=4, max_context=512).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    stream = client.chat.completions.create(model="m", messages=[user("Count to twenty.")], temperature=0,
                                            max_tokens=12, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    rest = list(chunks)
    stopper.join(120)
    assert not stopper.is_alive() and not srv.scheduler.alive
    assert first.choices and rest[-1].choices[0].finish_reason in ("stop", "length")


def test_web_demo_in_headless_chromium(server, media, tmp_path):
    """Upload a clip on the page, ask, and watch a streamed answer appear (screenshot saved in tmp_path)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    require_or_skip(chromium is not None and driver_bin is not None, "Chromium and chromedriver",
                    "apt-get install chromium chromium-driver (make test does it when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        driver.get(server.url + "/")
        assert "Video-LLaMA" in driver.title
        for control in ("media", "audio", "beams", "temperature", "restart", "send", "question"):
            driver.find_element(By.ID, control)
        driver.find_element(By.ID, "media").send_keys(str(media["video"]))
        WebDriverWait(driver, 30).until(lambda d: "uploaded" in d.find_element(By.ID, "status").text)
        driver.execute_script("document.getElementById('temperature').value = '0';")  # greedy
        driver.execute_script("document.getElementById('max_tokens').value = '8';")
        driver.find_element(By.ID, "question").send_keys("What happens in the video?")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 300).until(lambda d: d.find_element(By.ID, "status").text == "done"
                                         or d.find_elements(By.CLASS_NAME, "error"))
        assert not driver.find_elements(By.CLASS_NAME, "error"), driver.find_element(By.CLASS_NAME, "error").text
        answer = driver.find_element(By.CLASS_NAME, "assistant").text
        assert answer.startswith("Video-LLaMA: ") and len(answer) > len("Video-LLaMA: ")
        assert driver.execute_script("return window.chunksReceived") >= 2  # streamed, not one final block
        driver.save_screenshot(str(tmp_path / "web_demo.png"))
        assert (tmp_path / "web_demo.png").stat().st_size > 1000
    finally:
        driver.quit()
