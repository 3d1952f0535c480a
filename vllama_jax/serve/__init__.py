"""`vllama-jax serve`: an OpenAI-compatible video chat server with continuous batching, and the web demo.

    from vllama_jax.serve import Server
    server = Server(VideoLLaMAChat.embedded(), port=8000, allowed_media_paths=["clips/"])
    server.run()                        # until Ctrl-C, which drains the requests in flight

`api.py` parses requests, `scheduler.py` is the decode loop (one thread owning the model), `app.py` the HTTP app,
`page.html` the web demo.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Sequence

import uvicorn

from ..inference.chat import VideoLLaMAChat
from .api import APIError, ChatRequest, Limits, parse_request
from .app import ServeApp
from .scheduler import Metrics, Scheduler


class Server:
    """A `VideoLLaMAChat` served over HTTP (see the module docstring). `run()` blocks (the command line);
    `start()` / `stop()` run it in a background thread (tests, benchmarks)."""

    def __init__(self, chat: VideoLLaMAChat, *, host: str = "127.0.0.1", port: int = 8000,
                 allowed_media_paths: Sequence[str | os.PathLike] = (), max_batch: int = 32, max_prefills: int = 8,
                 max_queue: int = 256, max_context: int = 1024, top_k: int = 50, max_tokens_default: int = 256,
                 model_name: str | None = None, log_level: str = "warning", warmup: bool = False) -> None:
        self.scheduler = Scheduler(chat, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                                   top_k=top_k, prefills_per_step=max_prefills)
        if warmup:  # before the socket opens: /health answers once every batch shape is compiled
            self.scheduler.warm_up()
        self.app = ServeApp(self.scheduler, model_name=model_name or chat.name or "vllama-jax",
                            allowed_media_paths=list(allowed_media_paths), max_tokens_default=max_tokens_default)
        self.config = uvicorn.Config(self.app.app, host=host, port=port, log_level=log_level,
                                     timeout_graceful_shutdown=None)
        self.uvicorn = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        sockets = [s for srv in getattr(self.uvicorn, "servers", []) for s in srv.sockets]
        host, port = sockets[0].getsockname()[:2] if sockets else (self.config.host, self.config.port)
        return f"http://{host}:{port}"

    def run(self) -> None:
        self.uvicorn.run()

    def start(self, timeout: float = 600.0) -> "Server":
        self._thread = threading.Thread(target=self.uvicorn.run, name="vllama-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.uvicorn.started:
            raise RuntimeError("the server did not start")
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()


__all__ = ["APIError", "ChatRequest", "Limits", "Metrics", "Scheduler", "ServeApp", "Server", "parse_request"]
