"""``rwkvpy bench``'s report of what users feel: the step statistics on known numbers, the busy
machine rule on injected numbers, the timers' untimed first calls (on a fake clock), and one
real run of the demo model whose fields must agree with each other. Nothing here asserts that
anything is fast."""

import json
import math

import pytest

from rwkvpy import bench

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

MS = 1e-3


def test_step_stats_on_known_numbers():
    s = bench.step_stats([1 * MS, 1 * MS, 1 * MS, 1 * MS, 10 * MS])
    assert s["per_token_ms"] == pytest.approx(1.0)
    assert s["per_token_mean_ms"] == pytest.approx(2.8)
    assert s["per_token_p90_ms"] == pytest.approx(10.0)  # nearest rank: sorted[ceil(4.5) - 1]
    assert s["per_token_min_ms"] == pytest.approx(1.0)
    assert s["tokens_timed"] == 5 and s["decode_s"] == pytest.approx(0.014)
    assert s["decode_tokens_per_s"] == pytest.approx(5 / 0.014)  # the whole run, not 1/median
    why = bench.busy_reason(s)
    assert why == "mean 2.80 ms vs median 1.00 ms; p90 10.00 ms vs median 1.00 ms"


@pytest.mark.parametrize(
    "values, q, want",
    [
        ([1, 1, 1, 1, 10], 90, 10),
        (list(range(1, 11)), 90, 9),
        (list(range(20, 0, -1)), 90, 18),
        ([7], 90, 7),
        ([3, 1, 2], 50, 2),
        ([], 90, math.nan),
    ],
)
def test_percentile_is_the_nearest_rank(values, q, want):
    got = bench.percentile(values, q)
    assert (math.isnan(got) and math.isnan(want)) or got == want


def test_no_step_timed_is_nan_not_an_error():
    s = bench.step_stats([])
    assert s["tokens_timed"] == 0 and math.isnan(s["per_token_mean_ms"])
    assert bench.busy_reason(s) is None


def stats(median, mean, p90):
    return {"per_token_ms": median, "per_token_mean_ms": mean, "per_token_p90_ms": p90}


@pytest.mark.parametrize(
    "s, load, cpus, want",
    [
        (stats(1.0, 1.05, 1.2), (0.4, 1.9), 2, None),  # a quiet run
        (stats(1.0, 1.5, 1.9), (2.0, 2.0), 2, None),  # at the thresholds: not above them
        (
            stats(0.5, 4.6, 0.6),
            (5.2, 5.0),
            2,
            "load average 5.20 -> 5.00 on 2 CPUs; mean 4.60 ms vs median 0.50 ms",
        ),
        (stats(1.0, 1.1, 2.5), (0.1, 0.2), 4, "p90 2.50 ms vs median 1.00 ms"),
        (stats(1.0, 1.0, 1.0), (0.2, 1.5), 1, "load average 0.20 -> 1.50 on 1 CPU"),
        (stats(1.0, 1.0, 1.0), (None, 9.0), 2, "load average 9.00 on 2 CPUs"),
        (stats(1.0, 1.0, 1.0), (9.0, 9.0), None, None),  # no CPU count: the load is not judged
    ],
)
def test_busy_reason_on_injected_numbers(s, load, cpus, want):
    assert bench.busy_reason(s, *load, cpus) == want


def test_machine_fields_and_the_warning_line(monkeypatch):
    monkeypatch.setattr(bench, "usable_cpus", lambda: 2)
    f = bench.machine_fields(stats(0.5, 4.6, 0.6), 5.2, 5.0)
    assert f["busy"] is True and f["cpus"] == 2 and f["load_avg_start"] == 5.2
    assert f["busy_reason"] == "load average 5.20 -> 5.00 on 2 CPUs; mean 4.60 ms vs median 0.50 ms"
    assert bench.busy_warning(f["busy_reason"]) == (
        "warning: the machine was busy (load average 5.20 -> 5.00 on 2 CPUs; mean 4.60 ms vs "
        "median 0.50 ms): these numbers are not this model's speed"
    )
    quiet = bench.machine_fields(stats(1.0, 1.0, 1.0), 0.3, 0.5)
    assert quiet["busy"] is False and quiet["busy_reason"] is None


# -- the timers: first calls untimed, on a fake clock ----------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class FakeModel:
    """Each forward call advances the clock: the first by 100 s (a compilation), then 1 s."""

    def __init__(self, clock):
        self.clock, self.calls = clock, []

    def forward(self, ids, state):
        self.calls.append(list(ids))
        self.clock.now += 100.0 if len(self.calls) == 1 else 1.0
        return None, (state or 0) + 1

    def synchronize(self):
        self.calls.append("sync")

    def wait_for_kernels(self, timeout=None):
        return True  # nothing compiling in a second process (rwkvpy.coldstart)


def test_first_calls_are_never_timed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    model = FakeModel(clock)
    seen = []
    times = bench.time_decode(
        model, list(range(10)), 4, before=lambda: seen.append(len(model.calls))
    )
    assert times == [1.0] * 4
    # three untimed warm-up steps (the first one the slow one), then the timed ones
    assert model.calls[:4] == [[0], [1], [2], "sync"] and seen == [4]
    assert [c for c in model.calls[4:] if c != "sync"] == [[3], [4], [5], [6]]

    clock, model = FakeClock(), None
    monkeypatch.setattr(bench, "time", clock)
    model = FakeModel(clock)
    assert bench.time_prompt(model, [1, 2, 3]) == 1.0  # the second call of the same length
    assert [c for c in model.calls if c != "sync"] == [[1, 2, 3], [1, 2, 3]]


class SteadyModel(FakeModel):
    """Every forward call advances the clock by ``step`` seconds."""

    def __init__(self, clock, step):
        super().__init__(clock)
        self.step = step

    def forward(self, ids, state):
        self.calls.append(list(ids))
        self.clock.now += self.step
        return None, (state or 0) + 1


def test_warm_up_lasts_until_a_governed_thread_count_settles(monkeypatch):
    """The untimed calls go on (over the warm-up ids again) for settle_s seconds, so that a
    thread count the governor lowered while a first run's second process compiled is back
    before the timing; the default is runtime.settle_seconds(), 0 for a fixed count."""
    from rwkvpy import runtime

    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    model = SteadyModel(clock, 0.25)
    times = bench.time_decode(model, list(range(20)), 2, settle_s=1.6)
    calls = [c for c in model.calls if c != "sync"]
    # 7 warm-up calls (1.75 s >= 1.6 s) over ids 0, 1, 2, then the timed ones: ids 3, 4
    assert calls == [[0], [1], [2], [0], [1], [2], [0], [3], [4]] and times == [0.25, 0.25]

    monkeypatch.setattr(runtime.GOVERNOR, "active", False)
    assert runtime.settle_seconds() == 0
    monkeypatch.setattr(runtime.GOVERNOR, "active", True)
    assert runtime.settle_seconds() == (runtime.UP_LOOKS + 1) * runtime.WINDOW_S
    model = SteadyModel(clock, 0.125)
    bench.time_decode(model, list(range(20)), 1)  # the governor's settle time: 0.6 s
    assert len([c for c in model.calls if c != "sync"]) == 5 + 1  # 5 x 0.125 s >= 0.6 s


# -- one real run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run():
    from rwkvpy.demo import demo_model_path

    real = bench.cpu_read_bandwidths
    bench.cpu_read_bandwidths = lambda *a, **k: {"torch.sum": 10.0}  # not under test here
    try:
        return bench.run(str(demo_model_path()), tokens=8, prompt=8, threads=1)
    finally:
        bench.cpu_read_bandwidths = real


def test_run_reports_consistent_user_figures(demo_run):
    r = demo_run
    assert r["tokens_timed"] == 8 and r["prompt_tokens"] == 8
    assert r["per_token_min_ms"] <= r["per_token_ms"] <= r["per_token_p90_ms"]
    assert r["per_token_min_ms"] <= r["per_token_mean_ms"]
    assert r["decode_s"] == pytest.approx(
        r["tokens_timed"] * r["per_token_mean_ms"] / 1e3, rel=1e-3, abs=1e-5
    )
    assert r["decode_tokens_per_s"] == pytest.approx(
        r["tokens_timed"] / r["decode_s"], rel=1e-3, abs=0.1
    )
    assert r["cpus"] >= 1 and r["cpu_count"] >= r["cpus"]
    for k in ("load_avg_start", "load_avg_end"):
        assert r[k] is None or r[k] >= 0
    assert isinstance(r["busy"], bool) and r["busy"] == (r["busy_reason"] is not None)
    json.dumps(r)  # --json prints it


def test_run_reports_the_kernels_when_the_model_has_them(demo_run):
    import rwkvpy

    kernels = getattr(rwkvpy.load("demo", threads=1), "kernels", None)
    assert ("kernels" in demo_run) == (kernels is not None)
    if kernels is not None:
        assert demo_run["kernels"] == kernels


@pytest.mark.parametrize("busy", [False, True])
def test_report_text(demo_run, busy):
    why = "load average 5.2 on 2 CPUs" if busy else None
    r = dict(
        demo_run,
        busy=busy,
        busy_reason=why,
        kernels={
            "mode": "fast",
            "cpu_capability": {"level": "avx2", "forced": False},
            "products": {"Q8_0": "int8-dot", "F32": "float"},
        },
    )
    lines = bench.format_report(r).splitlines()
    assert "kernels:      mode fast; CPU level avx2; products Q8_0 int8-dot, F32 float" in lines
    per_token = next(x for x in lines if x.startswith("per token:"))
    assert "median" in per_token and "mean" in per_token and "p90" in per_token
    assert any(x.startswith("decode:") and "tokens/s over the timed run" in x for x in lines)
    assert any(x.startswith("machine:") and "load average" in x for x in lines)
    warnings = [x for x in lines if x.startswith("warning:")]
    assert warnings == ([bench.busy_warning(why)] if busy else [])
