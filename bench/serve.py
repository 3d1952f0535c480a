"""Serving throughput of `vllama-jax serve` (continuous batching) on the embedded default, against the same requests
answered one at a time.

The requests: R questions (half about one generated clip with sound, sent as a file:// video_url, half text only),
greedy, at most --max-tokens new tokens each. Each is sent through the official `openai` client with stream=True
by C concurrent clients (C = 1, 8, 32), each client sending its share back to back. Reported per C: requests/s,
generated tokens/s, time to first token (client side) p50 / p99, and per-token latency (the mean gap between a
request's chunks after the first) p50. The baseline answers the same requests one after another with
`VideoLLaMAChat` (no server, media encoded once, the same greedy settings), right before each level (this shared
machine's speed drifts by 2x within minutes: each ratio compares two runs seconds apart). The server starts with
``--warmup`` (every batch shape compiled before it answers /health) and a warm-up round compiles the prefill
shapes, so nothing timed waits for a compilation.

The server runs as users run it: `vllama-jax serve` in its own process (``--server process``, the default), so
the clients' threads (HTTP, SSE parsing) do not share the server's interpreter lock; ``--server thread`` starts it
inside the benchmark's process instead (the clients then slow the server down).

    python bench/serve.py [--requests 32] [--max-tokens 32] [--clients 1,8,32] [--max-prefills 8]
                          [--server process|thread] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import free_port  # noqa: E402
from tests.media_helpers import make_video  # noqa: E402
from vllama_jax.inference import GenerationConfig, VideoLLaMAChat  # noqa: E402
from vllama_jax.serve import Server  # noqa: E402

QUESTIONS = ["What happens in the video?", "What colour is the shape?", "Which way does it move?",
             "What does it sound like?", "Describe the scene.", "Is it day or night?", "How many objects are there?",
             "What is the mood of the video?"]
TEXT_QUESTIONS = ["Name a fruit.", "What is the capital of France?", "Give me a colour.", "Say hello.",
                  "What is two plus two?", "Name an animal.", "Tell me a short joke.", "What day comes after Monday?"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def server_process(media_dir: str, args: argparse.Namespace, max_batch: int) -> Iterator[str]:
    """`vllama-jax serve` on the embedded default in a child process; yields its URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllama_jax.cli", "serve", "--port", str(port), "--allowed-media-path", media_dir,
           "--max-batch", str(max_batch), "--max-prefills", str(args.max_prefills), "--max-context",
           str(args.max_context), "--max-tokens", str(args.max_tokens), "--warmup"]
    # its log goes to a file: a pipe nobody reads would block the server once its access log filled the buffer
    log = open(Path(media_dir) / "server.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited with status {proc.returncode}: {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not answer /health within 600 s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # drains and exits cleanly
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def server_thread(chat: VideoLLaMAChat, media_dir: str, args: argparse.Namespace, max_batch: int) -> Iterator[str]:
    server = Server(chat, port=0, allowed_media_paths=[media_dir], max_batch=max_batch,
                    max_prefills=args.max_prefills, max_context=args.max_context,
                    max_tokens_default=args.max_tokens, warmup=True).start()
    try:
        yield server.url
    finally:
        server.stop()


def requests_for(n: int, clip: Path) -> list[list[dict]]:
    out = []
    for i in range(n):
        if i % 2 == 0:
            part = {"type": "video_url", "video_url": {"url": clip.as_uri()}}
            out.append([{"role": "user", "content": [part, {"type": "text", "text": QUESTIONS[(i // 2) % 8]}]}])
        else:
            out.append([{"role": "user", "content": TEXT_QUESTIONS[(i // 2) % 8]}])
    return out


def one(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, usage = [], None
    for chunk in client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    gaps = np.diff(stamps)
    return {"ttft": (stamps[0] if stamps else time.perf_counter()) - t0,
            "per_token": float(gaps.mean()) if len(gaps) else None,
            "tokens": usage.completion_tokens if usage else len(stamps)}


def run_level(client: openai.OpenAI, reqs: list[list[dict]], clients: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: one(client, m, max_tokens), reqs))
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    per_token = [r["per_token"] for r in results if r["per_token"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(reqs), "wall_s": wall, "requests_per_s": len(reqs) / wall,
            "tokens_per_s": tokens / wall, "generated_tokens": tokens,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "per_token_p50_s": float(np.percentile(per_token, 50)) if per_token else None}


def one_at_a_time(chat: VideoLLaMAChat, reqs: list[list[dict]], clip: Path, max_tokens: int) -> dict:
    """The same requests through VideoLLaMAChat, one after another (the clip encoded once, as the server does)."""
    upload = chat.prepare_video(clip, with_audio=True)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_tokens)
    t0 = time.perf_counter()
    for msgs in reqs:
        content = msgs[0]["content"]
        if isinstance(content, str):
            chat.answer_uploads([content], [None], cfg)
        else:
            chat.answer_uploads([content[1]["text"]], [upload], cfg)
    wall = time.perf_counter() - t0
    return {"requests": len(reqs), "wall_s": wall, "requests_per_s": len(reqs) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--max-prefills", type=int, default=8, help="the server's --max-prefills")
    ap.add_argument("--server", choices=("process", "thread"), default="process",
                    help="run the server as its own process (as users do) or as a thread of this one")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    levels = [int(c) for c in args.clients.split(",")]
    load_before = uptime()
    print(f"load before: {load_before}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        clip = make_video(Path(tmp) / "clip.mp4", n_frames=8, audio={"seconds": 1.0})
        chat = VideoLLaMAChat.embedded()
        reqs = requests_for(args.requests, clip)
        serving = (server_process(tmp, args, max(levels)) if args.server == "process"
                   else server_thread(chat, tmp, args, max(levels)))
        with serving as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
            print("warm-up (compiles every shape the run uses) ...", flush=True)
            # every prompt's prefill shapes at the top level, then each level's batch and slot shapes (a video
            # and a text request at least)
            run_level(client, reqs, max(levels), args.max_tokens)
            for level in sorted(set(levels)):
                run_level(client, reqs[:max(2, level)], level, args.max_tokens)
            one_at_a_time(chat, reqs[:2], clip, args.max_tokens)
            results = []
            for level in levels:
                # the baseline right before each level: this shared machine's speed drifts by 2x within minutes,
                # so each ratio compares two runs a few seconds apart
                base = one_at_a_time(chat, reqs, clip, args.max_tokens)
                r = run_level(client, reqs, level, args.max_tokens)
                r["one_at_a_time"] = base
                r["speedup_vs_one_at_a_time"] = r["requests_per_s"] / base["requests_per_s"]
                results.append(r)
                print(f"  one at a time (VideoLLaMAChat): {base['requests_per_s']:.2f} req/s ({base['wall_s']:.1f} s)")
                print(f"  {level:3d} clients: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
                      f"TTFT p50 {r['ttft_p50_s']:.2f} s p99 {r['ttft_p99_s']:.2f} s, per-token p50 "
                      f"{(r['per_token_p50_s'] or 0) * 1000:.0f} ms ({r['wall_s']:.1f} s): "
                      f"{r['speedup_vs_one_at_a_time']:.1f}x the one-at-a-time throughput", flush=True)
    load_after = uptime()
    print(f"load after: {load_after}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "command": " ".join(sys.argv),
              "load_before": load_before, "load_after": load_after, "max_tokens": args.max_tokens,
              "server": args.server, "max_prefills": args.max_prefills,
              "levels": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
