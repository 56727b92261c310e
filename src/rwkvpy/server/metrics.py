"""``GET /metrics``: the server's counters in Prometheus' text format (prometheus_client).

Each server (each Ray replica) has its own registry, never the process-wide default one:

- ``rwkvpy_requests_total{route, status}``: HTTP requests answered, by route template (``other``
  for paths that are no route) and status code, 401s included; a streamed response counts
  when it ends;
- ``rwkvpy_prompt_tokens_total``: prompt tokens of the sequences started (cached ones included);
  ``rwkvpy_prefill_tokens_total``: those the model processed (the prefix cache's are not);
  ``rwkvpy_generation_tokens_total``: tokens chosen (a stop token included, as ``usage``'s
  ``completion_tokens`` counts them);
- ``rwkvpy_sequences_total{outcome}``: sequences ended, ``finished``, ``cancelled`` or ``failed``;
- ``rwkvpy_queue_length`` (sequences waiting for or in prefill), ``rwkvpy_running_sequences``
  (in the decode batch), ``rwkvpy_slots_used`` (generation slots the requests hold);
- ``rwkvpy_batch_size``: histogram of the sequences in each ``forward_batch`` call;
- ``rwkvpy_time_to_first_token_seconds``: histogram, from a sequence's submission to its first
  token chosen (the prompt's wait and prefill);
  ``rwkvpy_time_per_output_token_seconds``: histogram of the time between a sequence's
  consecutive tokens (one observation per token after the first);
- ``rwkvpy_prefix_cache_hits_total`` / ``_misses_total`` (lookups that found / did not find a
  cached prefix), ``rwkvpy_prefix_cache_bytes``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ROUTES = frozenset(
    (
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/states",
        "/v1/stats",
    )
)
_PREFIXES = (("/v1/models/", "/v1/models/{id}"), ("/v1/states/", "/v1/states/{id}"))


def route_label(path: str) -> str:
    """The route template ``path`` belongs to, or ``other``."""
    if path in ROUTES:
        return path
    for prefix, label in _PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return label
    return "other"


class _EngineCollector:
    """The engine's and the prefix cache's counters, read when scraped."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        engine = self.server.engine
        st = engine.stats()
        for name, key, doc in (
            (
                "rwkvpy_prompt_tokens",
                "prompt_tokens",
                "Prompt tokens of the sequences started, cached ones included",
            ),
            (
                "rwkvpy_prefill_tokens",
                "prefill_tokens",
                "Prompt tokens processed by the model (not taken from the prefix cache)",
            ),
            (
                "rwkvpy_generation_tokens",
                "generated_tokens",
                "Tokens chosen by the sequences (a stop token included)",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=st[key])
        seqs = CounterMetricFamily(
            "rwkvpy_sequences", "Sequences ended, by outcome", labels=["outcome"]
        )
        seqs.add_metric(["finished"], st["sequences_done"])
        seqs.add_metric(["cancelled"], st["sequences_cancelled"])
        seqs.add_metric(["failed"], st["sequences_failed"])
        yield seqs
        yield GaugeMetricFamily(
            "rwkvpy_queue_length", "Sequences waiting for or in prefill", value=st["queued"]
        )
        yield GaugeMetricFamily(
            "rwkvpy_running_sequences", "Sequences in the decode batch", value=st["decoding"]
        )
        yield GaugeMetricFamily(
            "rwkvpy_slots_used", "Generation slots held by requests", value=self.server.slots_used
        )
        cache = st.get("prefix_cache")
        if cache is not None:
            yield CounterMetricFamily(
                "rwkvpy_prefix_cache_hits",
                "Prefix-cache lookups that found a cached prefix",
                value=cache["hits"],
            )
            yield CounterMetricFamily(
                "rwkvpy_prefix_cache_misses",
                "Prefix-cache lookups that found none",
                value=cache["misses"],
            )
            yield GaugeMetricFamily(
                "rwkvpy_prefix_cache_bytes",
                "Bytes of the states in the prefix cache",
                value=cache["nbytes"],
            )


class Metrics:
    """The registry of one server; the engine's ``observer`` (batch sizes and latencies)."""

    def __init__(self, server):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "rwkvpy_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self._batch = Histogram(
            "rwkvpy_batch_size",
            "Sequences per forward_batch call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self._ttft = Histogram(
            "rwkvpy_time_to_first_token_seconds",
            "From a sequence's submission to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self._tpot = Histogram(
            "rwkvpy_time_per_output_token_seconds",
            "Time between a sequence's consecutive tokens",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(server))

    # the engine's observer (called from the engine thread)
    def batch_size(self, n: int) -> None:
        self._batch.observe(n)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self._tpot.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: counts each HTTP response by route and status in ``metrics``."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.requests.labels(route_label(scope.get("path", "")), str(status[0])).inc()
