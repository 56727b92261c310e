"""The HTTP side: an OpenAI-compatible FastAPI app in front of the :class:`Engine`.

Routes: ``GET /health`` (no key needed), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST/GET /v1/states``,
``GET/DELETE /v1/states/{id}``, ``GET /v1/stats`` (engine and prefix-cache counters).

Every error is ``{"error": {"message", "type", "param", "code"}}`` with its status (400 bad JSON
or parameters, 401 missing or wrong key, 404 unknown model, state or route, 413 body too large,
429 too many running sequences, 503 shutting down, 500 otherwise); no traceback ever reaches a
client. A request holds one slot per sequence it generates (prompts x n) from the moment it is
accepted until its response ends; a client that goes away releases them at once and its
sequences leave the engine's batch at its next iteration.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import RwkvpyError
from ..sampling import SamplingParams
from . import protocol as P
from .engine import Engine, EngineClosed, Sequence

log = logging.getLogger("rwkvpy.server")

SHUTDOWN_MESSAGE = "the server is shutting down"


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 4096
    max_concurrent: int = 64          # sequences generating at once, all requests together
    max_request_bytes: int = 1 << 20
    graceful_timeout: float = 10.0    # seconds running requests get to finish on SIGTERM
    max_states: int = 64              # states saved through POST /v1/states, at most
    max_prompt_tokens: int = 32768    # longest prompt (a chat's whole conversation), in tokens


@dataclass
class NamedState:
    id: str
    state: object
    root: object
    tokens: int
    source: str                       # "file" or "request"
    created: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        return {"id": self.id, "object": "state", "created": self.created,
                "tokens": self.tokens, "source": self.source}


class ServerState:
    """What the routes share: the model, the engine, the slots, the named states."""

    def __init__(self, model, tokenizer, engine: Engine, config: ServerConfig, states=None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.config = config
        self.states: dict = dict(states or {})
        self.slots_used = 0
        self.draining = False
        self.requests_total = 0
        self.rejected_busy = 0
        self.started = int(time.time())
        self.fingerprint = f"rwkvpy-{model.fingerprint}"
        self.limits = P.Limits(max_tokens=config.max_tokens_limit,
                               max_sequences=config.max_concurrent,
                               max_prompt_tokens=config.max_prompt_tokens)

    # slots: only touched from the event loop's thread
    def acquire(self, n: int) -> None:
        if self.draining:
            raise P.ApiError(503, SHUTDOWN_MESSAGE, type="server_error",
                             code="server_shutting_down")
        if self.slots_used + n > self.config.max_concurrent:
            self.rejected_busy += 1
            raise P.ApiError(429, f"the server is busy: {self.slots_used} of "
                                  f"{self.config.max_concurrent} generation slots are in use and "
                                  f"this request needs {n}; retry later",
                             type="rate_limit_error", code="rate_limit_exceeded",
                             headers={"Retry-After": "1"})
        self.slots_used += n
        self.requests_total += 1

    def release(self, n: int) -> None:
        self.slots_used -= n

    def named(self, name):
        if name is None:
            return None, None
        ns = self.states.get(name)
        if ns is None:
            raise P.ApiError(404, f"no state named '{name}' (see GET /v1/states)", param="state",
                             code="state_not_found")
        return ns.state, ns.root

    def own_stats(self) -> dict:
        """The counters of this server alone (GET /v1/stats)."""
        return {"model": self.config.model_name, "slots_used": self.slots_used,
                "max_concurrent": self.config.max_concurrent,
                "requests_total": self.requests_total, "rejected_busy": self.rejected_busy,
                "named_states": len(self.states), "engine": self.engine.stats()}

    # Hooks for servers whose replicas share the named states and the counters
    # (server/ray_serve.py); here, with one process, there is nothing to share.
    async def sync_states(self) -> None:
        """Bring ``states`` up to date, before a route reads it."""

    async def state_saved(self, ns: NamedState) -> None:
        """``ns`` was put in ``states`` (an ApiError undoes it)."""

    async def state_deleted(self, sid: str) -> None:
        """``sid`` was removed from ``states``."""

    async def stats_body(self, own: dict) -> dict:
        """The body of GET /v1/stats, from this server's :meth:`own_stats`."""
        return own

    async def drain(self, grace: float) -> None:
        """SIGTERM: refuse new work, give running requests ``grace`` seconds, cancel the rest."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: %d running sequence(s), %.0f s to finish", self.slots_used, grace)
        deadline = time.monotonic() + grace
        while self.slots_used > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        n = self.engine.cancel_all(SHUTDOWN_MESSAGE)
        if n:
            log.info("shutting down: cancelled %d running sequence(s)", n)


class Job:
    """The sequences of one HTTP request and the queue their events arrive on."""

    def __init__(self, server: ServerState, slots: int):
        self.server = server
        self.slots = slots
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs: list = []
        self.closed = False

    def emitter(self, index: int):
        loop, queue = self.loop, self.queue

        def emit(event):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return emit

    def gone(self) -> None:
        """The client went away: stop generating, wake up whoever waits on the queue."""
        for s in self.seqs:
            s.cancel()
        self.server.engine.wake()
        self.queue.put_nowait((None, ("gone", None)))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self.seqs:
            s.cancel()
        self.server.engine.wake()
        self.server.release(self.slots)


class _JobStream(StreamingResponse):
    """A streaming response that closes its job however the response ends."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


# -- helpers ---------------------------------------------------------------------------------------
def error_response(err: P.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past ``limit`` bytes (the rest is drained, up to a cap,
    so that the client can read the answer), 400 when it is not a JSON object."""
    too_large = P.ApiError(413, f"the request body is larger than this server's limit of "
                                f"{limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared = int(declared)
        except ValueError:
            raise P.bad("invalid Content-Length header") from None
    cap = max(limit * 4, 16 << 20)
    if declared is not None and declared > cap:
        raise too_large
    body = bytearray()
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            if seen > cap:
                break
            continue
        body += chunk
    if seen > limit:
        raise too_large
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise P.bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise P.bad("the request body is not valid JSON: nested too deep",
                    code="invalid_json") from None
    if not isinstance(data, dict):
        raise P.bad("the request body must be a JSON object", code="invalid_json")
    P.check_unicode(data)
    return data


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (for responses that are not streamed)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken connection: the client is gone too
        log.debug("disconnect watch: %s", e)
    job.gone()


def _usage(prompt_tokens, completion_tokens, cached) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# -- the app ---------------------------------------------------------------------------------------
def create_app(server: ServerState) -> FastAPI:
    cfg = server.config

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.engine.stop)
            log.info("engine stopped")

    app = FastAPI(title="rwkvpy", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.server = server

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(P.ApiError)
    async def _api_error(request, exc: P.ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        if exc.status_code == 404:
            err = P.ApiError(404, f"no route {request.method} {request.url.path}",
                             code="not_found")
        elif exc.status_code == 405:
            err = P.ApiError(405, f"method {request.method} is not allowed on "
                                  f"{request.url.path}", code="method_not_allowed")
        else:
            err = P.ApiError(exc.status_code, str(exc.detail))
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(P.bad("invalid request"))

    @app.exception_handler(RwkvpyError)
    async def _input_error(request, exc):  # a request's text or tokens the model cannot take
        return error_response(P.bad(str(exc)))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc)
        return error_response(P.ApiError(500, "internal server error", type="server_error",
                                         code="internal_error"))

    # -- info routes -------------------------------------------------------------------------------
    def model_card():
        return {"id": cfg.model_name, "object": "model", "created": server.started,
                "owned_by": "rwkvpy"}

    @app.get("/health")
    async def health():
        if server.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "model": cfg.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        P.check_model({"model": model_id}, [cfg.model_name])
        return model_card()

    @app.get("/v1/stats")
    async def stats():
        return await server.stats_body(server.own_stats())

    # -- generation --------------------------------------------------------------------------------
    def start(job: Job, prompts, params, n, named) -> None:
        state, root = named
        if root is None:
            from ..prefix_cache import cache_root

            root = cache_root(server.model)
        P.check_prompt_tokens(prompts, server.limits)  # before anything runs
        for pi, prompt in enumerate(prompts):
            for j in range(n):
                job.seqs.append(Sequence(prompt.ids, params[j], job.emitter(pi * n + j),
                                         state=state, root=root,
                                         checkpoints=prompt.checkpoints))
        try:
            server.engine.submit(job.seqs)
        except EngineClosed:
            raise P.ApiError(503, SHUTDOWN_MESSAGE, type="server_error",
                             code="server_shutting_down") from None

    def event_error(ev) -> P.ApiError:
        if ev[0] == "cancelled":
            return P.ApiError(503, ev[1], type="server_error", code="server_shutting_down")
        return P.ApiError(400 if ev[2] else 500, ev[1],
                          type="invalid_request_error" if ev[2] else "server_error",
                          code=None if ev[2] else "internal_error")

    async def generate(request: Request, kind: str):
        body = await read_json(request, cfg.max_request_bytes)
        P.check_model(body, [cfg.model_name])
        V = server.model.config.vocab_size
        tok = server.tokenizer
        if kind == "chat":
            spec, msgs = P.parse_chat(body, server.limits, V)
            prompts = [await run_in_threadpool(P.render_messages, msgs, tok)]
        else:
            spec, raw = P.parse_completion(body, server.limits, V)
            prompts = await run_in_threadpool(P.encode_prompts, raw, tok)
        if spec.state is not None:
            await server.sync_states()
        named = server.named(spec.state)
        k = len(prompts) * spec.n
        server.acquire(k)
        job = Job(server, k)
        try:
            start(job, prompts, spec.params, spec.n, named)
        except BaseException:
            job.close()
            raise
        meta = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
                "created": int(time.time()), "model": cfg.model_name}
        if spec.stream:
            return _JobStream(_stream(job, spec, prompts, meta, kind), job)
        watch = asyncio.create_task(_watch_disconnect(request, job))
        try:
            return await _collect(job, spec, prompts, meta, kind)
        finally:
            watch.cancel()
            job.close()

    async def _collect(job, spec, prompts, meta, kind):
        k = len(job.seqs)
        texts = [[] for _ in range(k)]
        infos = [None] * k
        left = k
        while left:
            idx, ev = await job.queue.get()
            if ev[0] == "text":
                texts[idx].append(ev[1])
            elif ev[0] == "done":
                infos[idx] = ev[1]
                left -= 1
            elif ev[0] == "gone":
                return JSONResponse(P.ApiError(499, "client closed request").body(),
                                    status_code=499)
            else:
                raise event_error(ev)
        choices = []
        for i in range(k):
            text = "".join(texts[i])
            fr = infos[i]["finish_reason"]
            if kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant",
                                                        "content": text.lstrip()},
                                "logprobs": None, "finish_reason": fr})
            else:
                if spec.echo:
                    p = prompts[i // spec.n]
                    text = (p.text if p.text is not None
                            else server.tokenizer.decode(p.ids)) + text
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": fr})
        out = {"id": meta["id"], "object": "chat.completion" if kind == "chat"
               else "text_completion", "created": meta["created"], "model": meta["model"],
               "system_fingerprint": server.fingerprint, "choices": choices,
               "usage": _totals(spec, prompts, infos)}
        return JSONResponse(out)

    def _totals(spec, prompts, infos):
        pt = sum(len(p.ids) for p in prompts)
        ct = sum(i["completion_tokens"] for i in infos if i is not None)
        cached = sum(infos[pi * spec.n]["cached_tokens"] for pi in range(len(prompts))
                     if infos[pi * spec.n] is not None)
        return _usage(pt, ct, cached)

    async def _stream(job, spec, prompts, meta, kind):
        k = len(job.seqs)
        chat = kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": meta["id"], "object": obj, "created": meta["created"],
                "model": meta["model"], "system_fingerprint": server.fingerprint}
        if spec.include_usage:
            base["usage"] = None

        def chunk(i, piece=None, finish=None, role=False):
            if chat:
                delta = {}
                if role:
                    delta = {"role": "assistant", "content": ""}
                elif piece is not None:
                    delta = {"content": piece}
                c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [c]})

        for i in range(k):
            if chat:
                yield chunk(i, role=True)
            elif spec.echo:
                p = prompts[i // spec.n]
                yield chunk(i, p.text if p.text is not None else server.tokenizer.decode(p.ids))
        leading = [chat] * k  # chat replies leave out their leading whitespace
        infos = [None] * k
        left = k
        while left:
            idx, ev = await job.queue.get()
            if ev[0] == "text":
                piece = ev[1]
                if leading[idx]:
                    piece = piece.lstrip()
                    if not piece:
                        continue
                    leading[idx] = False
                yield chunk(idx, piece)
            elif ev[0] == "done":
                infos[idx] = ev[1]
                left -= 1
                yield chunk(idx, finish=ev[1]["finish_reason"])
            elif ev[0] == "gone":
                return
            else:
                yield _sse(event_error(ev).body())
                yield "data: [DONE]\n\n"
                return
        if spec.include_usage:
            yield _sse({**base, "choices": [], "usage": _totals(spec, prompts, infos)})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    # -- named states ------------------------------------------------------------------------------
    @app.get("/v1/states")
    async def list_states():
        await server.sync_states()
        return {"object": "list", "data": [s.describe() for s in server.states.values()]}

    @app.get("/v1/states/{state_id}")
    async def get_state(state_id: str):
        await server.sync_states()
        server.named(state_id)
        return server.states[state_id].describe()

    @app.delete("/v1/states/{state_id}")
    async def delete_state(state_id: str):
        await server.sync_states()
        server.named(state_id)
        del server.states[state_id]
        await server.state_deleted(state_id)
        return {"id": state_id, "object": "state", "deleted": True}

    @app.post("/v1/states")
    async def save_state(request: Request):
        body = await read_json(request, cfg.max_request_bytes)
        P.check_model(body, [cfg.model_name])
        sid = P.state_name(body, "id")
        if sid is None:
            raise P.bad("'id' is required: the name to save the state under", "id")
        await server.sync_states()
        saved = sum(1 for s in server.states.values() if s.source == "request")
        if sid not in server.states and saved >= cfg.max_states:
            raise P.bad(f"this server keeps at most {cfg.max_states} saved states: delete one "
                        f"first", "id", "too_many_states")
        msgs = P.check_messages(body, required=False)
        has_prompt = body.get("prompt") is not None
        if (msgs is None) == (not has_prompt):
            raise P.bad("give exactly one of 'messages' (a conversation) or 'prompt'", "messages")
        base_name = P.state_name(body)
        base_state, base_root = server.named(base_name)
        V = server.model.config.vocab_size
        if msgs is not None:
            prompt = await run_in_threadpool(P.render_messages, msgs, server.tokenizer, False)
        else:
            raw = P.completion_prompts(body, V)
            if len(raw) != 1:
                raise P.bad("'prompt' must be one prompt here", "prompt")
            prompt = (await run_in_threadpool(P.encode_prompts, raw, server.tokenizer))[0]
        server.acquire(1)
        job = Job(server, 1)
        watch = None
        try:
            start(job, [prompt], [SamplingParams(max_tokens=0)], 1, (base_state, base_root))
            watch = asyncio.create_task(_watch_disconnect(request, job))
            while True:
                _, ev = await job.queue.get()
                if ev[0] == "done":
                    break
                if ev[0] == "gone":
                    return JSONResponse(P.ApiError(499, "client closed request").body(),
                                        status_code=499)
                if ev[0] != "text":
                    raise event_error(ev)
        finally:
            if watch is not None:
                watch.cancel()
            job.close()
        from ..prefix_cache import cache_root

        state = ev[1]["state"]
        root = await run_in_threadpool(cache_root, server.model, state)
        base_tokens = server.states[base_name].tokens if base_name in server.states else 0
        ns = NamedState(sid, state, root, base_tokens + len(prompt.ids), "request")
        server.states[sid] = ns
        await server.state_saved(ns)
        return {**ns.describe(), "prompt_tokens": len(prompt.ids),
                "cached_tokens": ev[1]["cached_tokens"], "base": base_name}

    return app


class Guard:
    """ASGI middleware: with an API key, every route but /health needs
    ``Authorization: Bearer KEY`` (401 otherwise)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        got = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                got = value
                break
        scheme, _, token = got.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        msg = ("missing API key: send the header 'Authorization: Bearer KEY'" if not got
               else "invalid API key")
        err = P.ApiError(401, msg, code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        await error_response(err)(scope, receive, send)


def build_app(server: ServerState):
    """The ASGI application: the routes behind the API-key guard."""
    app = create_app(server)
    return Guard(app, server.config.api_key)

