"""The HTTP side of `vllama-jax serve`: a Starlette (ASGI) app with the OpenAI chat-completions endpoint (plain JSON
or server-sent events), `/v1/models`, `/health`, `/metrics` (Prometheus text) and the web demo at `/`.

Handlers only parse, resolve media (decoding a file that is not yet in the encoder cache happens here, in a worker
thread, so a file that is not media is refused before it reaches the decode loop) and wait for their events; the
model runs in the `Scheduler`'s thread. Every refusal is an OpenAI-style error object with a 4xx status.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import first_line
from ..media import MediaError
from .api import APIError, ChatRequest, Limits, parse_request
from .scheduler import Job, Scheduler

PAGE = Path(__file__).with_name("page.html")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class ServeApp:
    """The app around one `Scheduler` (started and stopped with the app's lifespan)."""

    def __init__(self, scheduler: Scheduler, *, model_name: str, allowed_media_paths: list[Path] = (),
                 max_tokens_default: int = 256) -> None:
        self.scheduler = scheduler
        self.model_name = model_name
        self._media_tmp = tempfile.TemporaryDirectory(prefix="vllama-serve-media-")
        self.limits = Limits(allowed_media_paths=[Path(p).resolve() for p in allowed_media_paths],
                             media_dir=Path(self._media_tmp.name), max_tokens_default=max_tokens_default,
                             max_n=scheduler.batcher.max_batch)
        self.app = Starlette(routes=[
            Route("/", self.page),
            Route("/health", self.health),
            Route("/metrics", self.metrics),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if not self.scheduler.alive:
            self.scheduler.start()
        try:
            yield
        finally:
            # uvicorn has already waited for the open responses; this drains whatever is left in the loop
            await asyncio.to_thread(self.scheduler.stop)
            self._media_tmp.cleanup()

    # ---- small endpoints -------------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        ok = self.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "down"}, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.scheduler.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "vllama-jax"}]})

    # ---- chat completions ------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, RecursionError) as e:  # also: nesting past the recursion limit, 5,000-digit numbers
                raise APIError(400, f"the request body is not valid JSON: {first_line(e)}",
                               code="invalid_json") from None
            req = await asyncio.to_thread(parse_request, body, self.limits)
            upload = await self._prepare_media(req)
        except APIError as e:
            self.scheduler.metrics.requests.labels("rejected").inc()
            self.scheduler.metrics.errors.labels(e.code or "error").inc()
            return error_response(e)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req, upload, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            self.scheduler.submit(job)
        except APIError as e:
            self.scheduler.metrics.requests.labels("rejected").inc()
            self.scheduler.metrics.errors.labels(e.code or "error").inc()
            return error_response(e)
        try:
            first = await events.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first[0] == "error":
            return error_response(first[1])
        prompt_tokens = first[1]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._sse(job, events, rid, created, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            texts, reasons, completion = await self._collect(req, events)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except APIError as e:
            return error_response(e)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": req.model or self.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                         "finish_reason": reasons[i]} for i in range(req.n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}})

    async def _prepare_media(self, req: ChatRequest) -> Any:
        """Decode the request's media unless its encoding is cached; a file that is not media is a 400."""
        ref = req.media
        if ref is None or self.scheduler.has_media(self.scheduler.media_key(ref.digest, req.with_audio)):
            return None
        try:
            return await asyncio.to_thread(self.scheduler.chat.prepare, ref.path, ref.kind, req.with_audio)
        except MediaError as e:
            raise APIError(400, f"the {ref.kind} is not a readable media file: {e.reason}",
                           code="invalid_media") from None

    @staticmethod
    async def _collect(req: ChatRequest, events: asyncio.Queue) -> tuple[list[str], list[str], int]:
        texts, reasons = [""] * req.n, [""] * req.n
        completion, left = 0, req.n
        while left:
            ev = await events.get()
            if ev[0] == "error":
                raise ev[1]
            if ev[0] == "done":
                _, i, reasons[i], count, texts[i] = ev
                completion += count
                left -= 1
        return texts, reasons, completion

    async def _sse(self, job: Job, events: asyncio.Queue, rid: str, created: int, prompt_tokens: int
                   ) -> AsyncIterator[str]:
        req = job.req
        model = req.model or self.model_name

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                   "choices": choices}
            if req.include_usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        completed = False
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(req.n)])
            completion, left = 0, req.n
            while left:
                ev = await events.get()
                if ev[0] == "error":
                    yield f"data: {json.dumps(ev[1].body())}\n\n"
                    break
                if ev[0] == "delta":
                    yield chunk([{"index": ev[1], "delta": {"content": ev[2]}, "logprobs": None,
                                  "finish_reason": None}])
                elif ev[0] == "done":
                    completion += ev[3]
                    left -= 1
                    yield chunk([{"index": ev[1], "delta": {}, "logprobs": None, "finish_reason": ev[2]}])
            if req.include_usage:
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                 "total_tokens": prompt_tokens + completion})
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            if not completed:  # the client went away (or the server is failing): free the rows now
                job.cancelled.set()


__all__ = ["ServeApp", "error_response"]
