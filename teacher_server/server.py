"""HTTP front-end of teacher_server (aiohttp): routing, content negotiation,
auth, request-size and queue limits, errors, metrics, graceful shutdown.

Lifecycle (`TeacherServer.serve`, run by `python -m teacher_server`):
1. bind and listen at once; /health answers 503 {"status": "loading"} and the
   scoring endpoints 503 + Retry-After while vLLM starts in a worker thread;
2. ready: /health 200 {"status": "ok"};
3. SIGTERM/SIGINT: /health 503 "shutting_down", the listening socket is closed,
   requests already admitted finish (up to `shutdown_timeout_s`), the engine is
   shut down, `serve` returns and the process exits 0.

Safety: bodies are only ever decoded by msgspec into the typed structs of
`protocol.py` (JSON or MessagePack; nothing is unpickled or evaluated); a body
over `max_request_bytes` is refused with 413 before it is decoded. A body is
read BEFORE the request is admitted to the queue, under a timeout (408), with at
most `max_reading` bodies being read at once (429 beyond): clients that stall
mid-upload cannot hold the queue's slots. At most `max_queue` requests are
admitted to scoring at once, the rest get 429 + Retry-After, so memory is
bounded by (max_queue + max_reading) x max_request_bytes; the API key is compared with
`hmac.compare_digest` and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import signal
import time
from typing import Callable

from aiohttp import web

from teacher_server.engine import TeacherEngine
from teacher_server.metrics import ServerMetrics
from teacher_server.protocol import (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, GenerateRequest, Health,
                                     LogprobsRequest, ProtocolError, count_tokens, decode, encode, media_type,
                                     validate_generate_request, validate_logprobs_request)

log = logging.getLogger("teacher_server")

# Endpoints that need no API key (liveness probes).
PUBLIC_PATHS = frozenset({"/health"})
KNOWN_PATHS = frozenset({"/health", "/metrics", "/v1/model", "/v1/tokenizer", "/v1/logprobs", "/v1/generate"})


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # loaded from --api-key-file; never logged
    max_queue: int = 64  # requests admitted at once (being read, queued in vLLM or running)
    max_request_bytes: int = 64 * 1024 * 1024
    retry_after_s: int = 1  # Retry-After sent with 429/503
    shutdown_timeout_s: float = 120.0  # how long SIGTERM waits for admitted requests
    body_read_timeout_s: float = 30.0  # a request body not fully received by then gets 408
    max_reading: int | None = None  # bodies being received at once (429 beyond); None = 4 x max_queue


class TeacherServer:
    def __init__(self, engine_factory: Callable[[], TeacherEngine], opts: ServerOptions):
        self._engine_factory = engine_factory
        self.opts = opts
        self.engine: TeacherEngine | None = None
        self.metrics = ServerMetrics()
        self._api_key = opts.api_key.encode() if opts.api_key else None
        self._draining = False
        self._inflight = 0
        self._reading = 0
        self._inflight_tokens = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self.load_error: BaseException | None = None
        self.app = web.Application(client_max_size=opts.max_request_bytes,
                                   middlewares=[self._error_middleware, self._auth_middleware])
        self.app.add_routes([
            web.get("/health", self._health),
            web.get("/metrics", self._metrics),
            web.get("/v1/model", self._model),
            web.get("/v1/tokenizer", self._tokenizer),
            web.post("/v1/logprobs", self._logprobs),
            web.post("/v1/generate", self._generate),
        ])

    # ------------------------------------------------------------------ lifecycle

    async def serve(self) -> int:
        """Listen, load the engine, serve until SIGTERM/SIGINT, drain; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self.opts.shutdown_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, self.opts.host, self.opts.port)
        await site.start()
        log.info("teacher_server listening on http://%s:%d (loading model)", self.opts.host, self.opts.port)
        loader = asyncio.create_task(self._load())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([loader, stop], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if loader.done() and self.load_error is not None:
            code = 1
        else:
            await stop
        log.info("teacher_server shutting down: finishing %d admitted request(s)", self._inflight)
        self._draining = True
        self.metrics.ready.set(0)
        await site.stop()  # no new connections
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.opts.shutdown_timeout_s)
        await runner.cleanup()
        if not loader.done():
            # SIGTERM while vLLM was still starting: let it finish so it can be shut down cleanly.
            with contextlib.suppress(Exception):
                await loader
        if self.engine is not None:
            # On the loop thread: AsyncLLM.shutdown cancels its output-handler task,
            # which is only safe from the loop that runs it.
            self.engine.shutdown()
        log.info("teacher_server stopped")
        return code

    async def _load(self) -> None:
        try:
            # vLLM start-up blocks for tens of seconds; a thread keeps /health answering.
            self.engine = await asyncio.get_running_loop().run_in_executor(None, self._engine_factory)
        except BaseException as e:  # noqa: BLE001 - reported, then the server exits 1
            self.load_error = e
            log.exception("teacher_server: the model failed to load")
            return
        self.metrics.ready.set(1)
        i = self.engine.info
        log.info("teacher_server ready: model=%s vocab_size=%d max_model_len=%d dtype=%s tokenizer_sha256=%s",
                 i.model, i.vocab_size, i.max_model_len, i.dtype, i.tokenizer_sha256)

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        endpoint = request.path if request.path in KNOWN_PATHS else "other"
        try:
            resp = await handler(request)
        except ProtocolError as e:
            resp = self._error_response(request, e)
        except web.HTTPRequestEntityTooLarge:
            resp = self._error_response(request, ProtocolError(
                413, "request_too_large", f"request body is larger than the server's limit of "
                f"{self.opts.max_request_bytes} bytes (--max-request-bytes); split the batch", None))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
            msg = (f"no endpoint {request.method} {request.path}; endpoints: GET /health, GET /metrics, "
                   "GET /v1/model, GET /v1/tokenizer, POST /v1/logprobs, POST /v1/generate")
            resp = self._error_response(request, ProtocolError(e.status, kind, msg, None))
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            log.exception("teacher_server: internal error on %s %s", request.method, request.path)
            resp = self._error_response(request, ProtocolError(
                500, "internal", f"internal error: {type(e).__name__}: {e}", None))
        self.metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if self._api_key is not None and request.path not in PUBLIC_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            # compare_digest on equal-type bytes: time does not depend on where they differ.
            ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)
            if not ok:
                self.metrics.rejected.labels("unauthorized").inc()
                raise ProtocolError(401, "unauthorized", "missing or wrong API key: send the header "
                                    "'Authorization: Bearer <key>' with the key in the server's --api-key-file",
                                    "Authorization")
        return await handler(request)

    def _error_response(self, request: web.Request, err: ProtocolError) -> web.Response:
        ct = _reply_type(request)
        headers = {}
        if err.status in (429, 503):
            headers["Retry-After"] = str(int(err.retry_after_s or self.opts.retry_after_s))
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return web.Response(status=err.status, body=encode(err.to_body(), ct), content_type=ct, headers=headers)

    # ------------------------------------------------------------------ admission

    def _ready_engine(self) -> TeacherEngine:
        if self._draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise ProtocolError(503, "shutting_down", "the teacher is shutting down; retry on another "
                                "replica or after it restarts", None, self.opts.retry_after_s)
        if self.engine is not None and self.engine.dead:
            raise ProtocolError(503, "engine_dead", "the teacher's vLLM engine has failed; restart the "
                                "server (its log holds the cause)", None, self.opts.retry_after_s)
        if self.engine is None:
            self.metrics.rejected.labels("loading").inc()
            raise ProtocolError(503, "loading", "the teacher model is still loading; retry shortly "
                                "(GET /health returns 200 once ready)", None, self.opts.retry_after_s)
        return self.engine

    @contextlib.asynccontextmanager
    async def _admit(self, endpoint: str):
        """Bound the requests in the server (429 beyond max_queue) and time them."""
        if self._inflight >= self.opts.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ProtocolError(429, "overloaded", f"the teacher's queue is full ({self._inflight} requests "
                                f"admitted, --max-queue {self.opts.max_queue}); retry after the Retry-After "
                                "delay", None, self.opts.retry_after_s)
        self._inflight += 1
        self._idle.clear()
        self.metrics.queue_depth.set(self._inflight)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._inflight -= 1
            self.metrics.queue_depth.set(self._inflight)
            if self._inflight == 0:
                self._idle.set()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    @contextlib.asynccontextmanager
    async def _admitted(self, request: web.Request, endpoint: str, request_type: type):
        """(engine, decoded request, phase timer) of a call to `endpoint`, inside
        its admission (`_admit`). The body is read (bounded, timed) before
        admission: a stalled upload holds no queue slot."""
        engine = self._ready_engine()
        phases = _Phases()
        with phases.timed("read"):
            body, ct = await self._read(request)
        async with self._admit(endpoint):
            with phases.timed("decode"):
                req = decode(body, request_type, ct)
            yield engine, req, phases
            phases.observe(self.metrics.phase, endpoint)  # reached only by requests answered 200

    async def _read(self, request: web.Request) -> tuple[bytes, str]:
        ct = media_type(request.headers.get("Content-Type"))
        if ct not in (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK):
            raise ProtocolError(415, "unsupported_media_type", f"Content-Type {ct!r} is not supported: send "
                                f"{CONTENT_TYPE_JSON} or {CONTENT_TYPE_MSGPACK}", "Content-Type")
        if request.content_length is not None and request.content_length > self.opts.max_request_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.opts.max_request_bytes,
                                                actual_size=request.content_length)
        limit = self.opts.max_reading if self.opts.max_reading is not None else 4 * self.opts.max_queue
        if self._reading >= limit:
            self.metrics.rejected.labels("reading_full").inc()
            raise ProtocolError(429, "overloaded", f"{self._reading} request bodies are being received; retry "
                                "after the Retry-After delay", None, self.opts.retry_after_s)
        self._reading += 1
        try:
            return await asyncio.wait_for(request.read(), timeout=self.opts.body_read_timeout_s), ct
        except asyncio.TimeoutError as e:
            raise ProtocolError(408, "request_timeout", f"the request body did not arrive within "
                                f"{self.opts.body_read_timeout_s:g}s; send the whole body promptly", None) from e
        finally:
            self._reading -= 1

    def _reply(self, request: web.Request, obj) -> web.Response:
        ct = _reply_type(request)
        return web.Response(body=encode(obj, ct), content_type=ct)

    # ------------------------------------------------------------------ handlers

    async def _health(self, request: web.Request) -> web.Response:
        if self._draining:
            status, code = "shutting_down", 503
        elif self.engine is None:
            status, code = "loading", 503
        elif self.engine.dead:
            status, code = "engine_dead", 503
        else:
            status, code = "ok", 200
        return web.Response(status=code, body=encode(Health(status)), content_type=CONTENT_TYPE_JSON)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, ct = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ct})

    async def _model(self, request: web.Request) -> web.Response:
        return self._reply(request, self._ready_engine().info)

    async def _tokenizer(self, request: web.Request) -> web.Response:
        return self._reply(request, self._ready_engine().tokenizer)

    async def _logprobs(self, request: web.Request) -> web.Response:
        async with self._admitted(request, "/v1/logprobs", LogprobsRequest) as (engine, req, phases):
            info = engine.info
            with phases.timed("validate"):
                validate_logprobs_request(req, info.vocab_size, info.max_model_len, info.max_top_k)
            n_tokens = count_tokens(req)
            self._inflight_tokens += n_tokens
            self.metrics.queue_tokens.set(self._inflight_tokens)
            try:
                resp = await engine.score(req, phase=phases.add)
            finally:
                self._inflight_tokens -= n_tokens
                self.metrics.queue_tokens.set(self._inflight_tokens)
            self.metrics.sequences_scored.inc(len(req.sequences))
            self.metrics.tokens_prefilled.inc(n_tokens)
            self.metrics.tokens_scored.inc(sum(len(s.token_ids) - s.start for s in req.sequences))
            with phases.timed("encode"):
                reply = self._reply(request, resp)
        return reply

    async def _generate(self, request: web.Request) -> web.Response:
        async with self._admitted(request, "/v1/generate", GenerateRequest) as (engine, req, phases):
            info = engine.info
            with phases.timed("validate"):
                validate_generate_request(req, info.vocab_size, info.max_model_len)
            with phases.timed("engine"):
                resp = await engine.generate(req)
            self.metrics.tokens_generated.inc(sum(len(s.token_ids) for r in resp.results for s in r.samples))
            with phases.timed("encode"):
                reply = self._reply(request, resp)
        return reply


class _Phases:
    """Seconds per phase of one request, observed into the phase histogram once
    the request has succeeded (failed requests would skew the per-request means)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def observe(self, histogram, endpoint: str) -> None:
        for name, s in self.seconds.items():
            histogram.labels(endpoint, name).observe(s)


def _reply_type(request: web.Request) -> str:
    """Response encoding: the Accept header if it names a supported type, else the
    request's Content-Type if supported, else JSON."""
    accept = request.headers.get("Accept", "")
    for part in accept.split(","):
        mt = media_type(part) if part.strip() else ""
        if mt in (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK) and part.strip() not in ("*/*",):
            return mt
    ct = media_type(request.headers.get("Content-Type"))
    return ct if ct in (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK) else CONTENT_TYPE_JSON
