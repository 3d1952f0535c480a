"""`vllama-jax serve`: the OpenAI-compatible video chat server with continuous batching and the web demo
(`vllama_jax.serve`). Without ``--model`` it serves the embedded default (and says that its towers are untrained).
Ctrl-C stops accepting connections, finishes the requests in flight and exits with status 0."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from ..serve import Server
from .chat import add_model_args, load_chat
from .common import UsageError, add_common_args, info, run_command


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat server with continuous batching, and the web demo",
                       description="Serve POST /v1/chat/completions (OpenAI schema, video/image/audio parts, "
                                   "streaming), GET /v1/models, /health, /metrics and the web demo at /.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-media-path", action="append", default=[], metavar="DIR",
                   help="folder whose files requests may name as file:// URLs (repeatable; default: none, only "
                        "data: URLs)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N", help="rows of the running decode batch")
    p.add_argument("--max-prefills", type=int, default=8, metavar="N",
                   help="most requests admitted between two decode steps (their prefills run then; default 8)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting for a row before new ones get HTTP 429")
    p.add_argument("--max-context", type=int, default=1024, metavar="N",
                   help="KV slots per row: prompt (padded to compiled shapes) + max_tokens (default 1024)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="max_tokens of a request that gives none (default 256)")
    p.add_argument("--top-k", type=int, default=50, help="top-k of sampled requests, one value for the batch "
                                                         "(default 50, upstream's; 0 = off)")
    p.add_argument("--warmup", action="store_true",
                   help="compile the decode step for every batch size and context length before serving (one to "
                        "three minutes on a CPU for the embedded default), so no client waits for a compilation "
                        "when the load reaches a new shape")
    add_model_args(p, audio_flag=False, huge_pages=True)  # each request says whether it sends audio
    add_common_args(p, devices=True)
    p.set_defaults(run=lambda args: run_command(cmd_serve, args, interrupted="stopped"))


def cmd_serve(args: argparse.Namespace) -> int:
    for name in ("max_batch", "max_prefills", "max_queue", "max_context", "max_tokens", "num_frames"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for d in args.allowed_media_path:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--allowed-media-path {d}: no such folder")
    chat = load_chat(args, generation_config=None)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    if args.warmup:
        info("compiling the decode step for every batch shape (--warmup) ...")
    server = Server(chat, host=args.host, port=args.port, allowed_media_paths=args.allowed_media_path,
                    max_batch=args.max_batch, max_prefills=args.max_prefills, max_queue=args.max_queue,
                    max_context=args.max_context, top_k=args.top_k, max_tokens_default=args.max_tokens,
                    log_level="debug" if args.debug else "info", warmup=args.warmup)
    info(f"serving on http://{args.host}:{args.port} (web demo at /, OpenAI API at /v1; Ctrl-C stops)")
    try:
        # uvicorn handles Ctrl-C / SIGTERM: stop accepting, finish the open requests, drain the decode loop (the
        # app's lifespan); it then re-raises the signal, which ends here as a clean exit
        server.run()
    except KeyboardInterrupt:
        pass
    info("stopped")
    return 0
