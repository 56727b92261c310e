"""The OpenAI-compatible routes: models, completions, chat completions, named states, stats.

Each route finds the :class:`~rwkvpy.server.context.ServerState` at ``request.app.state.server``.
A request holds one slot per sequence it generates (prompts x n) from the moment it is accepted
until its response ends; a client that goes away releases them at once and its sequences leave
the engine's batch at its next iteration. Response shapes are server/responses.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..engine import EngineClosed, Sequence
from ..generation import CancelledEvent, DoneEvent, PromptEvent, TextEvent
from ..sampling import SamplingParams
from . import protocol as P
from . import responses as R
from . import structured as S
from .context import SHUTDOWN_MESSAGE, NamedState, ServerState

log = logging.getLogger("rwkvpy.server")

router = APIRouter()


def server_of(request: Request) -> ServerState:
    return request.app.state.server


class Gone:
    """Put on a job's queue when its client went away."""


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
        self.queue.put_nowait((None, Gone()))

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
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


# -- helpers ---------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past ``limit`` bytes (the rest is drained, up to a cap,
    so that the client can read the answer), 400 when it is not a JSON object."""
    too_large = P.ApiError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes",
        code="request_too_large",
    )
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
        raise P.bad(
            "the request body is not valid JSON: nested too deep", code="invalid_json"
        ) from None
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


def _client_closed() -> JSONResponse:
    return JSONResponse(P.ApiError(499, "client closed request").body(), status_code=499)


def event_error(ev) -> P.ApiError:
    """The ApiError of an ErrorEvent or a CancelledEvent."""
    if isinstance(ev, CancelledEvent):
        return P.ApiError(503, ev.reason, type="server_error", code="server_shutting_down")
    return P.ApiError(
        400 if ev.user_error else 500,
        ev.message,
        type="invalid_request_error" if ev.user_error else "server_error",
        code=None if ev.user_error else "internal_error",
    )


def start(server: ServerState, job: Job, prompts, params, n, named, score=None) -> None:
    """Submit ``n`` sequences per prompt (``params[j]`` for the j-th), from ``named`` (state,
    root); ``score``: None, or score each prompt with this many alternatives per token."""
    state, root = named
    if root is None:
        from ..prefix_cache import cache_root

        root = cache_root(server.model)
    P.check_prompt_tokens(prompts, server.limits)  # before anything runs
    for pi, prompt in enumerate(prompts):
        for j in range(n):
            job.seqs.append(
                Sequence(
                    prompt.ids,
                    params[j],
                    job.emitter(pi * n + j),
                    state=state,
                    root=root,
                    checkpoints=prompt.checkpoints,
                    prompt_logprobs=score,
                )
            )
    try:
        server.engine.submit(job.seqs)
    except EngineClosed:
        raise P.ApiError(
            503, SHUTDOWN_MESSAGE, type="server_error", code="server_shutting_down"
        ) from None


# -- info routes -----------------------------------------------------------------------------------
def _model_card(server: ServerState) -> dict:
    return {
        "id": server.config.model_name,
        "object": "model",
        "created": server.started,
        "owned_by": "rwkvpy",
    }


@router.get("/health")
async def health(request: Request):
    server = server_of(request)
    if server.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return {"status": "ok", "model": server.config.model_name}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(server_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    server = server_of(request)
    P.check_model({"model": model_id}, [server.config.model_name])
    return _model_card(server)


@router.get("/v1/stats")
async def stats(request: Request):
    server = server_of(request)
    return await server.stats_body(server.own_stats())


# -- generation ------------------------------------------------------------------------------------
class _Request:
    """One generation request, parsed: its prompts, spec, job and response metadata."""

    def __init__(self, server, kind, spec, prompts, job):
        self.server, self.kind, self.spec, self.prompts, self.job = (
            server,
            kind,
            spec,
            prompts,
            job,
        )
        self.chat = kind == "chat"
        self.tok = server.tokenizer
        self.meta = {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": server.config.model_name,
        }
        self.scoring = spec.echo and spec.logprobs is not None
        self.tools = spec.extra.get("tools")  # chat tools that constrain the reply

    def prompt_of(self, i: int):
        return self.prompts[i // self.spec.n]

    def echo_text(self, i: int) -> str:
        p = self.prompt_of(i)
        return p.text if p.text is not None else self.tok.decode(p.ids)

    def prompt_shape(self, i: int, entries) -> dict:
        return R.completion_logprobs(
            self.tok, entries, R.prompt_offsets(self.tok, self.prompt_of(i).ids)
        )

    def piece_shape(self, entries, base: int):
        """The logprobs of generated tokens (None when not asked for); ``base``: characters
        before the generated text in the choice's text (the echoed prompt)."""
        if self.spec.logprobs is None:
            return None
        if self.chat:
            return R.chat_logprobs(self.tok, entries)
        return R.completion_logprobs(self.tok, entries, [base + e.offset for e in entries])


async def _generate(request: Request, kind: str):
    server = server_of(request)
    cfg = server.config
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
    constraint = spec.params[0].constraint
    if constraint is not None:  # compile its matcher here, not on the engine's thread
        await run_in_threadpool(constraint.matcher, tok, V)
    if spec.state is not None:
        await server.sync_states()
    named = server.named(spec.state)
    k = len(prompts) * spec.n
    server.acquire(k)
    job = Job(server, k)
    req = _Request(server, kind, spec, prompts, job)
    try:
        start(
            server,
            job,
            prompts,
            spec.params,
            spec.n,
            named,
            score=spec.logprobs if req.scoring else None,
        )
    except BaseException:
        job.close()
        raise
    if spec.stream:
        return _JobStream(_stream(req), job)
    watch = asyncio.create_task(_watch_disconnect(request, job))
    try:
        return await _collect(req)
    finally:
        watch.cancel()
        job.close()


async def _collect(req: _Request):
    k = len(req.job.seqs)
    texts = [[] for _ in range(k)]
    lps = [[] for _ in range(k)]
    infos: list[Any] = [None] * k
    left = k
    while left:
        idx, ev = await req.job.queue.get()
        if isinstance(ev, TextEvent):
            texts[idx].append(ev.text)
            lps[idx] += ev.logprobs
        elif isinstance(ev, DoneEvent):
            infos[idx] = ev
            left -= 1
        elif isinstance(ev, PromptEvent):
            continue
        elif isinstance(ev, Gone):
            return _client_closed()
        else:
            raise event_error(ev)
    choices = []
    for i in range(k):
        text = "".join(texts[i])
        fr = infos[i].finish_reason
        if req.chat:
            c = R.chat_choice(i, text.lstrip(), fr, req.piece_shape(lps[i], 0))
            if req.tools is not None:
                c = S.shape_tool_reply(c, text, fr)
            choices.append(c)
            continue
        prefix = req.echo_text(i) if req.spec.echo else ""
        logprobs = req.piece_shape(lps[i], len(prefix))
        if req.scoring:
            head = req.prompt_shape(i, infos[i].prompt_logprobs)
            logprobs = {key: head[key] + logprobs[key] for key in head}
        choices.append(R.completion_choice(i, prefix + text, fr, logprobs))
    use = R.totals(req.prompts, infos, req.spec.n)
    return JSONResponse(R.body(req.kind, req.meta, req.server.fingerprint, choices, use))


async def _stream(req: _Request):
    k = len(req.job.seqs)
    spec = req.spec
    ch = R.Chunks(req.kind, req.meta, req.server.fingerprint, spec.include_usage)
    base = [0] * k  # characters of the echoed prompt before each choice's generated text
    for i in range(k):
        if req.chat:
            yield ch.role(i)
        elif spec.echo and not req.scoring:  # scored prompts go out with their logprobs
            text = req.echo_text(i)
            base[i] = len(text)
            yield ch.piece(i, text)
    leading = [req.chat] * k  # chat replies leave out their leading whitespace
    held = [[] for _ in range(k)]  # logprobs of that whitespace, sent with the next piece
    # with tools: each reply is held until its first character tells text from calls
    split = [S.ReplySplitter() if req.tools is not None else None for _ in range(k)]
    infos: list[Any] = [None] * k
    left = k
    while left:
        idx, ev = await req.job.queue.get()
        if isinstance(ev, TextEvent) and split[idx] is not None:
            ev = split[idx].feed(ev)
            if ev is None:
                continue
        if isinstance(ev, DoneEvent) and split[idx] is not None and split[idx].is_calls:
            found = split[idx].calls()
            if found:
                yield ch.tool_calls(idx, found)
            infos[idx] = ev
            left -= 1
            yield ch.finish(idx, S.tool_finish_reason(found, ev.finish_reason))
            continue
        if isinstance(ev, TextEvent):
            piece, entries = ev.text, held[idx] + list(ev.logprobs)
            if leading[idx]:
                piece = piece.lstrip()
                if not piece:
                    held[idx] = entries
                    continue
                leading[idx] = False
            held[idx] = []
            yield ch.piece(idx, piece, req.piece_shape(entries, base[idx]))
        elif isinstance(ev, PromptEvent):
            text = req.echo_text(idx)
            base[idx] = len(text)
            yield ch.piece(idx, text, req.prompt_shape(idx, ev.logprobs))
        elif isinstance(ev, DoneEvent):
            if held[idx] and spec.logprobs is not None:
                yield ch.piece(idx, "", req.piece_shape(held[idx], base[idx]))
            infos[idx] = ev
            left -= 1
            yield ch.finish(idx, ev.finish_reason)
        elif isinstance(ev, Gone):
            return
        else:
            yield R.sse(event_error(ev).body())
            yield R.DONE
            return
    if spec.include_usage:
        yield ch.usage(R.totals(req.prompts, infos, spec.n))
    yield R.DONE


@router.post("/v1/completions")
async def completions(request: Request):
    return await _generate(request, "completion")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _generate(request, "chat")


# -- named states ----------------------------------------------------------------------------------
@router.get("/v1/states")
async def list_states(request: Request):
    server = server_of(request)
    await server.sync_states()
    return {"object": "list", "data": [s.describe() for s in server.states.values()]}


@router.get("/v1/states/{state_id}")
async def get_state(request: Request, state_id: str):
    server = server_of(request)
    await server.sync_states()
    server.named(state_id)
    return server.states[state_id].describe()


@router.delete("/v1/states/{state_id}")
async def delete_state(request: Request, state_id: str):
    server = server_of(request)
    await server.sync_states()
    server.named(state_id)
    del server.states[state_id]
    await server.state_deleted(state_id)
    return {"id": state_id, "object": "state", "deleted": True}


@router.post("/v1/states")
async def save_state(request: Request):
    server = server_of(request)
    cfg = server.config
    body = await read_json(request, cfg.max_request_bytes)
    P.check_model(body, [cfg.model_name])
    sid = P.state_name(body, "id")
    if sid is None:
        raise P.bad("'id' is required: the name to save the state under", "id")
    await server.sync_states()
    saved = sum(1 for s in server.states.values() if s.source == "request")
    if sid not in server.states and saved >= cfg.max_states:
        raise P.bad(
            f"this server keeps at most {cfg.max_states} saved states: delete one first",
            "id",
            "too_many_states",
        )
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
        start(server, job, [prompt], [SamplingParams(max_tokens=0)], 1, (base_state, base_root))
        watch = asyncio.create_task(_watch_disconnect(request, job))
        while True:
            _, ev = await job.queue.get()
            if isinstance(ev, DoneEvent):
                break
            if isinstance(ev, Gone):
                return _client_closed()
            if not isinstance(ev, TextEvent):
                raise event_error(ev)
    finally:
        if watch is not None:
            watch.cancel()
        job.close()
    from ..prefix_cache import cache_root

    root = await run_in_threadpool(cache_root, server.model, ev.state)
    base_tokens = server.states[base_name].tokens if base_name in server.states else 0
    ns = NamedState(sid, ev.state, root, base_tokens + len(prompt.ids), "request")
    server.states[sid] = ns
    await server.state_saved(ns)
    return {
        **ns.describe(),
        "prompt_tokens": len(prompt.ids),
        "cached_tokens": ev.cached_tokens,
        "base": base_name,
    }
