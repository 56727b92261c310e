"""Session affinity for ``rwkvpy serve --ray``: a chat's turns go to the replica that caches it.

Each replica has its own prefix cache (the states of prompts it has read), so a conversation
whose next turn lands on another replica reads its whole history again. Ray Serve's HTTP proxy
chooses the replica before the request's body is read, so the router cannot see the prompt;
it sees the headers, and Ray Serve passes the ``X-Session-Id`` header to it as the request's
session id. :class:`SessionAffinityRouter` sends every request of a session to one replica,
chosen by rendezvous hashing of the session id over the live replicas' ids (every proxy of a
cluster computes the same; a replica that leaves moves only its own sessions), unless that
replica already has ``overload`` requests in flight or has not taken the request within
``patience`` seconds (full, or too busy to answer): then the request goes where Ray Serve's
default router would send it (the less loaded of two replicas). Requests without the header
are routed by that default.
"""

from __future__ import annotations

import hashlib
import time

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

SESSION_HEADER = "X-Session-Id"


def _score(session: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def home_replica(session: str, replicas: list[str]) -> str:
    """The replica (by id) that ``session`` goes to among ``replicas``."""
    return max(replicas, key=lambda r: _score(session, r))


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve request router: the session's home replica first (see the module)."""

    def initialize_state(self, overload: int = 0, patience: float = 2.0, **kwargs) -> None:
        # overload 0: no limit of our own (the replica's max_ongoing_requests still applies)
        self.overload = overload
        self.patience = patience  # seconds the home replica may take to answer the router

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session or len(candidate_replicas) < 2:
            return await super().choose_replicas(candidate_replicas, pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        home = by_id[home_replica(session, list(by_id))]
        busy = self.replica_queue_len_cache.get(home.replica_id)
        waited = time.time() - pending_request.created_at
        if (self.overload and busy is not None and busy >= self.overload) or waited > self.patience:
            return await super().choose_replicas(candidate_replicas, pending_request)
        # the home replica alone: asked again (with backoff) while it does not answer in time,
        # as happens on a busy machine, until ``patience`` runs out
        pending_request.routing_context.should_backoff = True
        return [[home]]
