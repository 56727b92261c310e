"""``rwkvpy serve``: load a model and serve it over HTTP (see rwkvpy.server).

:func:`add_serve_command` adds the subcommand to rwkvpy's command line; ``python -m
rwkvpy.server`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

from ..server.startup import ServeError, warm_up
from .options import add_model_argument, add_run_options, add_tokenizer_options, run_options

log = logging.getLogger("rwkvpy.server")

DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8000,
    "max_batch": 32,
    "max_concurrent": 64,
    "max_tokens_limit": 4096,
    "max_request_bytes": 1 << 20,
    "cache_bytes": 512 << 20,
    "cache_every": 256,
    "graceful_timeout": 10.0,
    "max_states": 64,
    "max_prompt_tokens": 32768,
}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d: dict = DEFAULTS
    add_model_argument(p)
    p.add_argument(
        "--model-name",
        metavar="NAME",
        default=None,
        help="the model id clients use (default: the file name without extension)",
    )
    p.add_argument(
        "--host",
        default=d["host"],
        help=f"address to bind (default {d['host']}: this machine only)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=d["port"],
        help=f"port (default {d['port']}; 0 picks a free one)",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $RWKVPY_API_KEY if set)",
    )
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="answer GET /metrics without the API key (for a Prometheus scraper that sends none)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=d["max_batch"],
        metavar="N",
        help=f"most sequences per batched decode step (default {d['max_batch']})",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=d["max_concurrent"],
        metavar="N",
        help="most sequences generating at once, all requests together; more get "
        f"429 (default {d['max_concurrent']})",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=d["max_tokens_limit"],
        metavar="N",
        help=f"largest max_tokens a request may ask for (default "
        f"{d['max_tokens_limit']}; also the chat default)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=d["max_request_bytes"],
        metavar="N",
        help=f"largest request body; larger gets 413 (default {d['max_request_bytes']})",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=d["max_prompt_tokens"],
        metavar="N",
        help="longest prompt in tokens (a chat's whole conversation); longer gets 400 "
        f"before it runs (default {d['max_prompt_tokens']})",
    )
    p.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a named starting state: an rwkvpy state file or a BlinkDL state-tuned "
        ".pth (repeatable)",
    )
    p.add_argument(
        "--max-states",
        type=int,
        default=d["max_states"],
        metavar="N",
        help=f"most states saved through POST /v1/states (default {d['max_states']})",
    )
    add_tokenizer_options(p)
    add_run_options(p)
    p.add_argument(
        "--cache-bytes",
        type=int,
        default=d["cache_bytes"],
        metavar="N",
        help=f"prefix cache memory cap in bytes: the states it keeps, least "
        f"recently used out first (default {d['cache_bytes']} = "
        f"{d['cache_bytes'] >> 20} MiB; 0 disables it)",
    )
    p.add_argument(
        "--cache-every",
        type=int,
        default=d["cache_every"],
        metavar="N",
        help=f"prefix cache checkpoint interval in tokens (default {d['cache_every']})",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=d["graceful_timeout"],
        metavar="SECONDS",
        help="on SIGTERM, how long running requests may finish "
        f"before they are cancelled (default "
        f"{d['graceful_timeout']:.0f})",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    r = p.add_argument_group("Ray Serve (pip install 'rwkvpy[ray]'; see docs/scale-out.md)")
    r.add_argument(
        "--ray",
        action="store_true",
        help="serve as a Ray Serve deployment of replicas (one model each) behind "
        "Ray Serve's HTTP proxy on --host/--port",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=None,
        help="with --ray: join this Ray cluster ('auto': the one 'ray start' runs "
        "here; default: start a local Ray instance)",
    )
    r.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: this many replicas (default 1)",
    )
    r.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        default=None,
        help="with --ray: let Ray Serve keep MIN to MAX replicas, by the load",
    )


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to an argparse subparsers object; it runs :func:`cmd_serve`."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, "
        "/v1/models, /v1/states, /health; OpenAI's clients work unchanged. "
        "Requests run together (continuous batching); SIGTERM drains and exits 0.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


# -- the command ---------------------------------------------------------------------------------
def _positive(name, v, zero_ok=False):
    if v < 0 or (v == 0 and not zero_ok):
        raise ServeError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {v}")


def _parse_states(items) -> list:
    out, seen = [], set()
    from ..server.protocol import STATE_ID

    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ServeError(f"--state expects NAME=FILE, got {item!r}")
        if not STATE_ID.fullmatch(name):
            raise ServeError(
                f"--state name {name!r}: use letters, digits, '.', '_', '-' (at most 64)"
            )
        if name in seen:
            raise ServeError(f"--state {name} is given twice")
        seen.add(name)
        out.append((name, path))
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _setup_logging(level: str) -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level.upper())


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ServeError(
            f"rwkvpy serve needs the server extra: pip install 'rwkvpy[server]' "
            f"({e.name} is missing)"
        ) from None
    if not hasattr(uvicorn.Server, "_serve"):
        raise ServeError(
            f"rwkvpy serve needs uvicorn >= 0.30 (found {uvicorn.__version__}): "
            f"pip install 'rwkvpy[server]'"
        )
    import rwkvpy

    from ..engine import Engine
    from ..prefix_cache import PrefixCache
    from ..server.app import NamedState, ServerConfig, ServerState, build_app
    from ..state import State

    _setup_logging(args.log_level)
    for name in (
        "max_batch",
        "max_concurrent",
        "max_tokens_limit",
        "max_request_bytes",
        "max_states",
        "max_prompt_tokens",
    ):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--cache-bytes", args.cache_bytes, zero_ok=True)
    _positive("--cache-every", args.cache_every, zero_ok=True)
    _positive("--graceful-timeout", args.graceful_timeout, zero_ok=True)
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, got {args.port}")
    states = _parse_states(args.state)
    api_key = args.api_key if args.api_key is not None else os.environ.get("RWKVPY_API_KEY")
    if api_key is not None and not api_key.strip():
        raise ServeError("--api-key is empty")
    if args.ray:
        from .serve_ray import cmd_serve_ray

        return cmd_serve_ray(args, api_key, states)
    if args.ray_address or args.replicas is not None or args.autoscale:
        raise ServeError("--ray-address, --replicas and --autoscale go with --ray")

    model = rwkvpy.load(args.model, **run_options(args))
    tok = model.tokenizer(args.tokenizer, args.vocab)
    name = args.model_name or (
        "demo"
        if args.model == "demo"
        else os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    )
    named = {}
    if states:
        from ..prefix_cache import cache_root

        for sname, path in states:
            st = State.from_file(path, model)
            named[sname] = NamedState(sname, st, cache_root(model, st), int(st.n_tokens), "file")
    warm_up(model)

    cache = (
        PrefixCache(max_bytes=args.cache_bytes, every=args.cache_every)
        if args.cache_bytes > 0
        else None
    )
    engine = Engine(model, tok, cache=cache, max_batch=args.max_batch)
    config = ServerConfig(
        model_name=name,
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        max_concurrent=args.max_concurrent,
        max_request_bytes=args.max_request_bytes,
        graceful_timeout=args.graceful_timeout,
        max_states=args.max_states,
        max_prompt_tokens=args.max_prompt_tokens,
        metrics_public=args.metrics_public,
    )
    server = ServerState(model, tok, engine, config, named)
    app = build_app(server)

    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _loopback(args.host) and api_key is None:
        log.warning(
            "listening on %s without an API key: anyone who can reach this address "
            "can use the model (give --api-key)",
            args.host,
        )
    log.info(
        "rwkvpy serve: model %r (%s, %s tokenizer), max batch %d, max concurrent %d",
        name,
        model.config.version.label,
        tok.name,
        args.max_batch,
        args.max_concurrent,
    )
    log.info("rwkvpy serve: listening on http://%s:%d", shown, port)
    uv_config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        lifespan="on",
        timeout_keep_alive=5,
        server_header=False,
    )
    _Server = _server_class(uvicorn)
    srv = _Server(uv_config, server)
    try:
        srv.run(sockets=[sock])
    finally:
        sock.close()
    log.info("rwkvpy serve: stopped")
    return 0


def _server_class(uvicorn):
    class _Server(uvicorn.Server):
        """uvicorn's server, with our own SIGTERM/SIGINT handling: the first signal starts a
        drain: running requests get ``graceful_timeout`` seconds, then are cancelled, while the
        server keeps listening and answers new requests 503 (a refused connection would look
        like a crash to a client or a load balancer); then uvicorn stops and the process exits
        with status 0 (uvicorn itself re-raises the signal after its shutdown, which would make
        the exit status 143). A second signal stops listening at once, a second SIGINT quits."""

        def __init__(self, config, state):
            super().__init__(config)
            self._state = state
            self._loop = None
            self._draining = False

        async def serve(self, sockets=None):
            import asyncio

            self._loop = asyncio.get_running_loop()
            with self.capture_signals():
                await self._serve(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if self._draining or self.should_exit or self._loop is None:
                if sig == signal.SIGINT and (self._draining or self.should_exit):
                    self.force_exit = True
                self.should_exit = True
                return
            self._draining = True
            log.info("rwkvpy serve: received %s", signal.Signals(sig).name)
            grace = self._state.config.graceful_timeout
            self._loop.call_soon_threadsafe(
                lambda: self._loop.create_task(self._drain_then_exit(grace))
            )

        async def _drain_then_exit(self, grace):
            try:
                await self._state.drain(grace)
            finally:
                self.should_exit = True  # uvicorn stops listening only now

    return _Server
