"""``rwkvpy serve --ray``: the same server as a Ray Serve deployment of several replicas.

Each replica is one Ray actor that loads the model once (memory-mapped; the repack cache of its
node reused), runs its own :class:`~rwkvpy.engine.Engine` (continuous batching, its own
prefix cache) and serves the very FastAPI app of :mod:`rwkvpy.server.app` through Ray Serve's
ASGI ingress: the paths, validation, API key, SSE streaming and error bodies are those of the
single-process server. Ray Serve's HTTP proxy spreads requests over the replicas.

Shared between replicas, through one :class:`StateStore` actor: the named states (``POST
/v1/states`` on one replica is usable from all of them; the store owns them, so they outlive the
replica that made them; at most ``--max-states`` saved ones, as in one process, plus the
``--state`` files) and the counters that ``GET /v1/stats`` sums. Not shared: each replica's
prefix cache, slots (``--max-concurrent`` is per replica) and engine.

Each response carries ``X-Rwkvpy-Replica`` (the replica that served it); ``/v1/stats`` adds
``replicas`` (each replica's own counters) to the sums. Requests that carry ``X-Session-Id`` go
to that session's replica (:mod:`rwkvpy.server.ray_router`), where its prefix is cached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("rwkvpy.server")

APP_NAME = "rwkvpy"
STORE_NAME = "rwkvpy-state-store"
REPLICA_HEADER = b"x-rwkvpy-replica"
STATS_EVERY = 0.5  # seconds between a replica's publications of its counters
STATS_STALE = 10.0  # a replica silent this long (gone) leaves the sums
# /v1/stats fields that are not summed over replicas: the largest is shown
MAX_FIELDS = ("max_batch_seen",)


# -- the shared store ----------------------------------------------------------------------------
class StateStore:
    """The named states and the replicas' counters (a Ray actor: one call at a time).

    A state is kept as an object this actor put in Ray's object store (so it is owned here, not
    by the replica that made it), under a token that changes whenever its name is saved again;
    replicas fetch the states whose tokens they have not seen."""

    def __init__(self, max_states: int):
        self.max_states = max_states
        self.version = 0
        self.entries: dict = {}  # id -> (token, source, ObjectRef of the NamedState)
        self.stats: dict = {}  # replica id -> (time, its /v1/stats body)

    def listing(self, known: int):
        """(version, {id: (token, ref)}), or (version, None) when ``known`` is current."""
        if known == self.version:
            return self.version, None
        return self.version, {k: (t, [ref]) for k, (t, _, ref) in self.entries.items()}

    def put(self, ns, file: bool = False):
        """Save ``ns`` (a NamedState); False when ``max_states`` saved states are already kept
        (``file``: a --state file, saved unless its name is taken, never counted)."""
        import ray

        if file:
            if ns.id in self.entries:
                return self.version, self.entries[ns.id][0]
        elif ns.id not in self.entries or self.entries[ns.id][1] != "request":
            saved = sum(1 for _, src, _ in self.entries.values() if src == "request")
            if saved >= self.max_states:
                return self.version, None
        self.version += 1
        self.entries[ns.id] = (self.version, ns.source, ray.put(ns))
        return self.version, self.version

    def delete(self, sid: str):
        if self.entries.pop(sid, None) is not None:
            self.version += 1
        return self.version

    def publish(self, replica: str, body: dict) -> None:
        self.stats[replica] = (time.monotonic(), body)

    def forget(self, replica: str) -> None:
        self.stats.pop(replica, None)

    def all_stats(self) -> dict:
        now = time.monotonic()
        self.stats = {r: v for r, v in self.stats.items() if now - v[0] < STATS_STALE}
        return {r: body for r, (_, body) in self.stats.items()}


def merge_stats(parts: dict) -> dict:
    """One /v1/stats body from the replicas' own ``{replica: body}``: numbers summed (the
    MAX_FIELDS: the largest), nested dicts merged alike, other values from any replica; and
    ``replicas``: each replica's body, by id."""

    def merge(bodies):
        out = {}
        for b in bodies:
            for k, v in b.items():
                if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
                    out.setdefault(k, v)
                elif isinstance(v, dict):
                    out.setdefault(k, [])
                    if isinstance(out[k], list):
                        out[k].append(v)
                elif k in MAX_FIELDS:
                    out[k] = max(out.get(k, v), v)
                else:
                    out[k] = out.get(k, 0) + v
        return {
            k: merge(v) if isinstance(v, list) and v and isinstance(v[0], dict) else v
            for k, v in out.items()
        }

    body = merge(list(parts.values()))
    body["replicas"] = [{"replica": r, **b} for r, b in sorted(parts.items())]
    return body


# -- a replica -----------------------------------------------------------------------------------
def _server_state_class():
    from . import protocol as P
    from .app import ServerState

    class SharedServerState(ServerState):
        """ServerState whose named states and /v1/stats come from the StateStore."""

        def __init__(self, *a, store, replica: str, **kw):
            super().__init__(*a, **kw)
            self.store = store
            self.replica = replica
            self.seen_version = -1
            self.tokens: dict = {}  # id -> the store's token of our copy
            self.lock = asyncio.Lock()

        async def sync_states(self) -> None:
            async with self.lock:
                version, listing = await self.store.listing.remote(self.seen_version)
                if listing is None:
                    return
                fresh = {}
                for sid, (token, (ref,)) in listing.items():
                    if self.tokens.get(sid) == token and sid in self.states:
                        fresh[sid] = self.states[sid]
                    else:
                        fresh[sid] = await ref
                self.states.clear()
                self.states.update(fresh)
                self.tokens = {sid: t for sid, (t, _) in listing.items()}
                self.seen_version = version

        async def state_saved(self, ns) -> None:
            _, token = await self.store.put.remote(ns)
            if token is None:
                self.states.pop(ns.id, None)
                raise P.bad(
                    f"this server keeps at most {self.config.max_states} saved states: "
                    f"delete one first",
                    "id",
                    "too_many_states",
                )
            self.tokens[ns.id] = token

        async def state_deleted(self, sid: str) -> None:
            await self.store.delete.remote(sid)
            self.tokens.pop(sid, None)

        async def stats_body(self, own: dict) -> dict:
            await self.store.publish.remote(self.replica, own)
            return merge_stats(await self.store.all_stats.remote())

    return SharedServerState


class _ReplicaHeader:
    """ASGI middleware: ``X-Rwkvpy-Replica: ID`` on every HTTP response."""

    def __init__(self, app, replica: str):
        self.app = app
        self.value = replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.value)],
                }
            await send(message)

        return await self.app(scope, receive, tagged)


class Replica:
    """One replica of the deployment: the model, its engine, the app (see the module's
    docstring). ``spec``: what ``rwkvpy serve`` was given (see :func:`replica_spec`)."""

    async def __init__(self, spec: dict, store):  # type: ignore[misc]  # Ray Serve awaits it
        from ray import serve

        try:
            ctx = serve.get_replica_context()
            rid = getattr(ctx.replica_id, "unique_id", None) or str(ctx.replica_id)
        except Exception:  # noqa: BLE001 - outside a Serve replica (local testing)
            rid = f"pid{os.getpid()}"
        self.replica = rid
        self.store = store
        self.server = await asyncio.to_thread(_build_server, spec, store, rid)
        files = [ns for ns in self.server.states.values() if ns.source == "file"]
        self.server.states.clear()  # the store's copies are the ones replicas use
        for ns in files:
            await store.put.remote(ns, True)
        self._publisher = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        while True:
            try:
                await self.store.publish.remote(self.replica, self.server.own_stats())
            except Exception as e:  # noqa: BLE001 - the store restarting: try again later
                log.debug("stats publication failed: %s", e)
            await asyncio.sleep(STATS_EVERY)

    def __serve_build_asgi_app__(self):
        from .app import build_app

        return _ReplicaHeader(build_app(self.server), self.replica)

    async def __del__(self):
        self._publisher.cancel()
        try:
            await self.store.forget.remote(self.replica)
        except Exception:  # noqa: BLE001 - the store may be gone first at shutdown
            pass


def _build_server(spec: dict, store, replica: str):
    import rwkvpy

    from ..engine import Engine
    from ..prefix_cache import PrefixCache, cache_root
    from ..state import State
    from .app import NamedState, ServerConfig
    from .startup import warm_up

    model = rwkvpy.load(spec["model"], **spec["load_kw"])
    tok = model.tokenizer(spec["tokenizer"], spec["vocab"])
    named = {}
    for sname, path in spec["states"]:
        st = State.from_file(path, model)
        named[sname] = NamedState(sname, st, cache_root(model, st), int(st.n_tokens), "file")
    warm_up(model)
    e = spec["engine"]
    cache = (
        PrefixCache(max_bytes=e["cache_bytes"], every=e["cache_every"])
        if e["cache_bytes"] > 0
        else None
    )
    engine = Engine(model, tok, cache=cache, max_batch=e["max_batch"])
    config = ServerConfig(**spec["config"])
    return _server_state_class()(model, tok, engine, config, named, store=store, replica=replica)


# -- the deployment ------------------------------------------------------------------------------
def deploy(
    spec: dict,
    *,
    replicas: int = 1,
    autoscale: tuple | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking_timeout: float = 300.0,
) -> str:
    """Start the deployment on the connected Ray cluster; returns the proxy's URL once every
    replica is up. Ray must be initialized; :func:`shutdown` undoes it."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    threads = spec["load_kw"]["threads"]
    store = (
        ray.remote(StateStore)
        .options(name=STORE_NAME, namespace="serve", get_if_exists=True, max_restarts=0, num_cpus=0)
        .remote(spec["config"]["max_states"])
    )
    options = {
        "ray_actor_options": {"num_cpus": threads},
        "max_ongoing_requests": spec["config"]["max_concurrent"] + 16,
        "graceful_shutdown_timeout_s": max(spec["config"]["graceful_timeout"], 0.1),
        "health_check_period_s": 2.0,
        "logging_config": {"enable_access_log": spec.get("access_log", True)},
        # X-Session-Id: a session's requests go to one replica, where its prefix is cached
        "request_router_config": RequestRouterConfig(
            # a path: imported where each proxy runs (pydantic's signature confuses mypy)
            request_router_class="rwkvpy.server.ray_router.SessionAffinityRouter",  # type: ignore[arg-type]
            request_router_kwargs={"overload": spec["config"]["max_concurrent"]},
        ),
    }
    if autoscale is not None:
        lo, hi = autoscale
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "initial_replicas": max(lo, 1),
            # one replica per this many requests in flight
            "target_ongoing_requests": max(1, spec["config"]["max_concurrent"] // 2),
        }
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress()(Replica), name="rwkvpy")
    deployment = deployment.options(**options)  # type: ignore[attr-defined]  # Ray's stub types
    if port == 0:
        port = _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment.bind(spec, store), name=APP_NAME, route_prefix="/", blocking=False)
    _wait_running(blocking_timeout)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _wait_running(timeout: float) -> None:
    from ray import serve

    from .startup import ServeError

    deadline = time.monotonic() + timeout
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = str(getattr(status, "status", "")).rsplit(".", 1)[-1]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeError(f"the Ray Serve deployment failed: {status.message}")
        if time.monotonic() > deadline:
            raise ServeError(
                f"the Ray Serve deployment did not start in {timeout:.0f} s "
                f"({state or 'no status'})"
            )
        time.sleep(0.2)


def shutdown() -> None:
    """Remove the deployment and the state store (Ray itself stays up)."""
    import ray
    from ray import serve

    serve.shutdown()
    try:
        ray.kill(ray.get_actor(STORE_NAME, namespace="serve"))
    except ValueError:
        pass


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
