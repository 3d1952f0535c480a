"""The decode loop of the server: one background thread owns the model (`VideoLLaMAChat` and its engine) and a
`ContinuousBatcher`; requests arrive through a queue and their tokens leave through per-request callbacks.

Each turn of the loop admits waiting requests (up to `prefills_per_step`) while the batch has free rows (media
encoded through an LRU cache keyed by the file's content hash; the prompts built by `VideoLLaMAChat.conversation` /
`build_context`; prefilled reusing cached prefixes, the short ones on top of a kept prefix in one shared call;
inserted into free rows, one per choice), drops the rows of requests whose client went away, and runs one decode
step for every running row. Nothing waits for another request to finish.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..errors import VllamaError
from ..inference.batching import ContextTooLong, ContinuousBatcher, Prefilled, RowRequest
from ..inference.chat import VideoLLaMAChat, _TextStream
from ..inference.generate import GenerationConfig
from ..inference.uploads import Upload
from .api import APIError, ChatRequest

#: what a request's callback receives: ("admitted", prompt_tokens) | ("delta", choice, text) |
#: ("done", choice, finish_reason, completion_tokens, text) | ("error", APIError)
Event = tuple


class Metrics:
    """The server's Prometheus metrics (own registry, so several servers can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vllama_requests", "chat completion requests by outcome", ["outcome"], registry=r)
        self.errors = Counter("vllama_request_errors", "refused requests by error code", ["code"], registry=r)
        self.queue_length = Gauge("vllama_queue_length", "requests waiting for a row of the batch", registry=r)
        self.running = Gauge("vllama_running_batch_size", "rows decoding in the running batch", registry=r)
        self.prompt_tokens = Counter("vllama_prompt_tokens", "prompt positions of admitted requests", registry=r)
        self.prefill_tokens = Counter("vllama_prefill_tokens", "prompt positions actually prefilled (the rest came "
                                                               "from the prefix cache)", registry=r)
        self.generated_tokens = Counter("vllama_generation_tokens", "generated tokens", registry=r)
        self.encoder_hits = Counter("vllama_encoder_cache_hits", "media served from the encoder cache", registry=r)
        self.encoder_misses = Counter("vllama_encoder_cache_misses", "media encoded", registry=r)
        self.prefix_hits = Counter("vllama_prefix_cache_hits", "prefills that reused a cached prefix", registry=r)
        self.prefix_misses = Counter("vllama_prefix_cache_misses", "prefills from scratch", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("vllama_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=buckets, registry=r)
        self.tpot = Histogram("vllama_time_per_output_token_seconds", "time between a request's tokens",
                              buckets=buckets, registry=r)


@dataclass
class Job:
    """One request in the server: the parsed request, its prepared upload (None: no media, or already encoded)
    and where its events go."""

    req: ChatRequest
    upload: Upload | None
    post: Callable[[Event], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    choices_left: int = 0


class _Choice:
    """One row of the batch: a choice of a job, its tokens, and its text stream."""

    def __init__(self, job: Job, index: int, chat: VideoLLaMAChat, markers: list[str]) -> None:
        self.job, self.index, self.chat = job, index, chat
        self.tokens: list[int] = []
        self.last = job.arrived
        self.stream = _TextStream(chat.tokenizer, markers, lambda text: job.post(("delta", index, text)))

    def add(self, token: int) -> bool:
        """Record a token; True when a stop string of the request appeared in the text."""
        self.tokens.append(token)
        self.stream.on_step(len(self.tokens), np.asarray([token]))
        return bool(self.job.req.stop) and self._cut()[1]

    def _cut(self) -> tuple[str, bool]:
        text = self.chat.decode_answer(self.tokens)
        cuts = [i for i in (text.find(s) for s in self.job.req.stop) if i >= 0]
        return (text[:min(cuts)].rstrip(), True) if cuts else (text, False)

    def finish(self, reason: str) -> None:
        text, stopped = self._cut()
        self.stream.finish(text)
        self.job.post(("done", self.index, "stop" if stopped or reason in ("eos", "stop") else "length",
                       len(self.tokens), text))


class Scheduler:
    """Owns the chat model and the running batch; `submit` from any thread, the loop runs in its own thread."""

    def __init__(self, chat: VideoLLaMAChat, *, max_batch: int = 32, max_queue: int = 256,
                 max_context: int = 1024, top_k: int = 50, media_cache_size: int = 32,
                 prefix_cache_size: int = 16, prefills_per_step: int = 8, metrics: Metrics | None = None) -> None:
        self.chat = chat
        self.metrics = metrics or Metrics()
        self.max_queue = int(max_queue)
        self.prefills_per_step = int(prefills_per_step)
        base = chat.resolve_config(GenerationConfig(do_sample=False, max_new_tokens=1))
        self.batcher = ContinuousBatcher(chat.generator, base, max_batch=max_batch, slot_length=max_context,
                                         top_k=top_k, prefix_cache_size=prefix_cache_size)
        self.markers = chat._markers()  # noqa: SLF001 - the chat's own stop texts, not to be copied here
        self.media_cache: collections.OrderedDict[str, tuple[Upload, list[np.ndarray]]] = collections.OrderedDict()
        self.media_cache_size = int(media_cache_size)
        self._media_lock = threading.Lock()
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._pending = 0  # submitted, not yet admitted (inbox + waiting)
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllama-decode-loop", daemon=True)
        self.failure: BaseException | None = None
        self._ids = itertools.count()

    # ---- outside the loop ------------------------------------------------------------------------------------
    def warm_up(self) -> int:
        """Compile every shape of the running batch now (`ContinuousBatcher.warm_up`), before the loop starts;
        returns the number of programs compiled."""
        if self.alive:
            raise RuntimeError("warm_up runs before the decode loop starts")
        return self.batcher.warm_up()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running and queued requests, then end the loop."""
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def media_key(self, digest: str, with_audio: bool) -> str:
        return f"{digest}:{int(with_audio)}"

    def has_media(self, key: str) -> bool:
        with self._media_lock:
            return key in self.media_cache

    def submit(self, job: Job) -> None:
        """Queue a job; raises APIError 429 when the queue is full, 503 when shutting down."""
        if self._stop.is_set() or not self.alive:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise APIError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                               type="rate_limit_error", code="queue_full")
            self._pending += 1
            self.metrics.queue_length.set(self._pending)
        self._inbox.put(job)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._collect(block=self.batcher.active == 0 and not self._waiting)
                self._admit()
                self._drop_cancelled()
                if self.batcher.active:
                    self._step()
                elif self._stop.is_set() and not self._waiting and self._inbox.empty():
                    return
        except BaseException as e:  # noqa: BLE001 - reported to every request still open, then re-raised
            self.failure = e
            err = APIError(500, f"the decode loop failed: {type(e).__name__}: {e}", type="server_error",
                           code="internal_error")
            for job in list(self._waiting) + [o.job for o in self.batcher.rows if o is not None]:
                job.post(("error", err))
            raise

    def _collect(self, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _dequeued(self) -> None:
        with self._pending_lock:
            self._pending -= 1
            self.metrics.queue_length.set(self._pending)

    def _admit(self) -> None:
        # a bounded number of prefills between two steps, so a burst of arrivals does not stall the running rows;
        # the admitted requests are prefilled together (`ContinuousBatcher.prefill_many`: short questions on top
        # of kept prefixes share one call)
        admitted: list[tuple[Job, RowRequest]] = []
        rows, taken = self.batcher.active, 0
        while self._waiting and taken < self.prefills_per_step:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                self._dequeued()
                self.metrics.requests.labels("cancelled").inc()
                continue
            if rows + job.req.n > self.batcher.max_batch:
                break
            self._waiting.popleft()
            self._dequeued()
            taken += 1
            with self._refusals(job):
                row = self._row_request(job)
                if row is not None:
                    admitted.append((job, row))
                    rows += job.req.n
        if not admitted:
            return
        for (job, _), pre in zip(admitted, self.batcher.prefill_many([r for _, r in admitted])):
            with self._refusals(job):
                if isinstance(pre, BaseException):
                    raise pre
                self._started(job, pre)

    @contextlib.contextmanager
    def _refusals(self, job: Job) -> Iterator[None]:
        """A request's own bad input (its media, its prompt's length) refuses it with a 4xx; the loop goes on."""
        try:
            yield
        except APIError as e:
            self.fail(job, e)
        except ContextTooLong as e:
            self.fail(job, APIError(400, str(e), code="context_length_exceeded", param="messages"))
        except (VllamaError, ValueError) as e:
            self.fail(job, APIError(400, str(e), code="invalid_request"))

    def fail(self, job: Job, err: APIError) -> None:
        """Count and report a refused request."""
        self.metrics.requests.labels("rejected").inc()
        self.metrics.errors.labels(err.code or "error").inc()
        job.post(("error", err))

    def _media(self, job: Job) -> tuple[Upload | None, list[np.ndarray], str]:
        ref = job.req.media
        if ref is None:
            return None, [], ""
        key = self.media_key(ref.digest, job.req.with_audio)
        with self._media_lock:
            hit = self.media_cache.get(key)
            if hit is not None:
                self.media_cache.move_to_end(key)
        if hit is not None:
            self.metrics.encoder_hits.inc()
            return hit[0], hit[1], key
        if job.upload is None:
            raise APIError(500, "media not prepared", type="server_error", code="internal_error")
        blocks = self.chat.encode([job.upload])[0]
        self.metrics.encoder_misses.inc()
        # the cache keeps the encoded blocks and the upload's message, not the decoded frames
        light = Upload(job.upload.kind, job.upload.message, job.upload.system, job.upload.blocks, path=job.upload.path,
                       note=job.upload.note, join_question=job.upload.join_question)
        with self._media_lock:
            self.media_cache[key] = (light, blocks)
            while len(self.media_cache) > self.media_cache_size:
                self.media_cache.popitem(last=False)
        return light, blocks, key

    def _row_request(self, job: Job) -> RowRequest | None:
        """The prompt of a job as a row of the batch (its media encoded or taken from the cache); None when the job
        was answered here (beam search runs on its own)."""
        req = job.req
        upload, blocks, key = self._media(job)
        turns = [(role, text, upload if media is not None else None) for role, text, media in req.turns]
        conv = self.chat.conversation(turns, system=req.system)
        ctx = self.chat.build_context(conv, blocks, max_new_tokens=0, max_positions=self.batcher.slot_length)
        if ctx.truncated:
            raise ContextTooLong(f"the conversation has {ctx.embeds.shape[0] + ctx.truncated} positions, more than "
                                 f"the model's context budget ({self.chat.max_length})")
        items: list[Any] = []
        media_end = 0
        for k, ids in enumerate(ctx.segment_ids):
            items.extend(int(t) for t in ids)
            if k < len(blocks):
                items.append((f"{key}/{k}", int(np.asarray(blocks[k]).reshape(-1, ctx.embeds.shape[1]).shape[0])))
                media_end = len(items)
        # kept prefixes: the system prompt (every conversation with it starts there), the media block and what
        # the template puts between it and the question (the next question about the same media), the whole
        # prompt (a follow-up turn starts with it)
        question = len(items) - len(ctx.segment_ids[-1]) + self.chat.tail_tokens(ctx, req.turns[-1][1])
        points = sorted({p for p in (self.chat.head_tokens(conv, ctx), media_end, question) if p})
        points.append(len(items))
        if req.num_beams > 1:
            self._beam(job, ctx.embeds)
            return None
        return RowRequest(ctx.embeds, items, req.max_tokens, greedy=req.greedy, temperature=req.temperature,
                          top_p=req.top_p, seed=req.seed, cache_points=points)

    def _started(self, job: Job, pre: Prefilled) -> None:
        """A job's prompt is prefilled: its rows (one per choice) join the batch."""
        req = job.req
        (self.metrics.prefix_hits if pre.prefix_hit else self.metrics.prefix_misses).inc()
        self.metrics.prompt_tokens.inc(pre.prompt_tokens)
        self.metrics.prefill_tokens.inc(pre.prefilled_tokens)
        job.post(("admitted", pre.prompt_tokens))
        job.choices_left = req.n
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i
            self.batcher.insert(pre if i == 0 else self.batcher.fork(pre, seed),
                                _Choice(job, i, self.chat, self.markers + req.stop))
        self.metrics.running.set(self.batcher.active)

    def _beam(self, job: Job, embeds: np.ndarray) -> None:
        """Beam search is not a row of the batch (the beams of one request are the batch): it runs here, between
        two steps of the running batch, and answers at once."""
        req = job.req
        cfg = GenerationConfig(do_sample=False, num_beams=req.num_beams, max_new_tokens=req.max_tokens)
        job.post(("admitted", int(embeds.shape[0])))
        self.metrics.prompt_tokens.inc(int(embeds.shape[0]))
        self.metrics.prefill_tokens.inc(int(embeds.shape[0]))
        out = self.chat.generate_contexts([embeds], cfg)
        choice = _Choice(job, 0, self.chat, self.markers + req.stop)
        choice.tokens = list(out.tokens[0])
        self.metrics.generated_tokens.inc(len(choice.tokens))
        self.metrics.ttft.observe(time.perf_counter() - job.arrived)
        choice.finish(out.finish_reasons[0])
        self.metrics.requests.labels("ok").inc()

    def _drop_cancelled(self) -> None:
        for i, owner in enumerate(self.batcher.rows):
            if owner is not None and owner.job.cancelled.is_set():
                self._release(i, owner, "cancelled")

    def _release(self, row: int, owner: _Choice, outcome: str | None) -> None:
        self.batcher.release(row, expect_more=bool(self._waiting) or not self._inbox.empty())
        self.metrics.running.set(self.batcher.active)
        owner.job.choices_left -= 1
        if outcome == "cancelled" and owner.job.choices_left == 0:
            self.metrics.requests.labels("cancelled").inc()
        elif outcome == "ok" and owner.job.choices_left == 0:
            self.metrics.requests.labels("ok").inc()

    def _step(self) -> None:
        results = self.batcher.step()
        now = time.perf_counter()
        for owner, token, reason in results:
            first = not owner.tokens
            stopped = owner.add(token)
            (self.metrics.ttft if first else self.metrics.tpot).observe(now - owner.last)
            owner.last = now
            self.metrics.generated_tokens.inc()
            if reason or stopped:
                owner.finish(reason)
                self._release(self.batcher.rows.index(owner), owner, "ok")


__all__ = ["Event", "Job", "Metrics", "Scheduler"]
