"""What the server's routes share: its configuration, the model and engine, the generation
slots, the named states. One :class:`ServerState` per server process (per replica on Ray)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from . import protocol as P

log = logging.getLogger("rwkvpy.server")

SHUTDOWN_MESSAGE = "the server is shutting down"


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 4096
    max_concurrent: int = 64  # sequences generating at once, all requests together
    max_request_bytes: int = 1 << 20
    graceful_timeout: float = 10.0  # seconds running requests get to finish on SIGTERM
    max_states: int = 64  # states saved through POST /v1/states, at most
    max_prompt_tokens: int = 32768  # longest prompt (a chat's whole conversation), in tokens
    metrics_public: bool = False  # GET /metrics answers without the API key


@dataclass
class NamedState:
    id: str
    state: object
    root: object
    tokens: int
    source: str  # "file" or "request"
    created: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        return {
            "id": self.id,
            "object": "state",
            "created": self.created,
            "tokens": self.tokens,
            "source": self.source,
        }


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
        self.metrics: Any = None  # server/metrics.py's Metrics, made by create_app
        self.fingerprint = f"rwkvpy-{model.fingerprint}"
        self.limits = P.Limits(
            max_tokens=config.max_tokens_limit,
            max_sequences=config.max_concurrent,
            max_prompt_tokens=config.max_prompt_tokens,
        )

    # slots: only touched from the event loop's thread
    def acquire(self, n: int) -> None:
        if self.draining:
            raise P.ApiError(
                503, SHUTDOWN_MESSAGE, type="server_error", code="server_shutting_down"
            )
        if self.slots_used + n > self.config.max_concurrent:
            self.rejected_busy += 1
            raise P.ApiError(
                429,
                f"the server is busy: {self.slots_used} of "
                f"{self.config.max_concurrent} generation slots are in use and "
                f"this request needs {n}; retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.slots_used += n
        self.requests_total += 1

    def release(self, n: int) -> None:
        self.slots_used -= n

    def named(self, name):
        if name is None:
            return None, None
        ns = self.states.get(name)
        if ns is None:
            raise P.ApiError(
                404,
                f"no state named '{name}' (see GET /v1/states)",
                param="state",
                code="state_not_found",
            )
        return ns.state, ns.root

    def own_stats(self) -> dict:
        """The counters of this server alone (GET /v1/stats)."""
        return {
            "model": self.config.model_name,
            "slots_used": self.slots_used,
            "max_concurrent": self.config.max_concurrent,
            "requests_total": self.requests_total,
            "rejected_busy": self.rejected_busy,
            "named_states": len(self.states),
            "engine": self.engine.stats(),
        }

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
