"""rwkvpy.runtime: the OpenMP wait setting rwkvpy puts into the environment before torch loads
libgomp, and a user's own setting winning. Each case runs in a fresh interpreter, since the
setting only matters (and is only made) before ``import torch``. No timings here: the speed is
measured by benchmarks/load.py."""

import json
import os
import subprocess
import sys

import pytest

from rwkvpy import runtime

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

SHOW = (
    "import json, os, sys\n"
    "{pre}\n"
    "names = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')\n"
    "print(json.dumps({{k: os.environ.get(k) for k in names}}))"
)


def _run(code: str, env_extra: dict | None = None, args=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in runtime.WAIT_VARIABLES}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )


def _env_after(pre: str, env_extra: dict | None = None) -> dict:
    p = _run(SHOW.format(pre=pre), env_extra)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_rwkvpy_sets_the_policy():
    got = _env_after("import rwkvpy")
    assert got == {"OMP_WAIT_POLICY": None, **runtime.SETTINGS}


def test_the_setting_is_in_place_when_torch_loads():
    # torch's libgomp reads the variable as it loads: it must be set before torch is imported
    code = (
        "import sys, builtins, os\n"
        "seen = {}\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name == 'torch' and 'torch' not in sys.modules and not seen:\n"
        "        seen.update({k: os.environ.get(k) for k in %r})\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        "import rwkvpy\n"
        "import json; print(json.dumps(seen))" % (runtime.WAIT_VARIABLES,)
    )
    p = _run(code)
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen and all(seen[k] == v for k, v in runtime.SETTINGS.items())


@pytest.mark.parametrize(
    "user",
    [
        {"GOMP_SPINCOUNT": "300000"},
        {"OMP_WAIT_POLICY": "ACTIVE"},
        {"OMP_WAIT_POLICY": "passive"},
        {"GOMP_SPINCOUNT": ""},
    ],
)
def test_a_users_setting_wins(user):
    got = _env_after("import rwkvpy", user)
    want = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    want.update(user)
    assert got == want


def test_nothing_is_set_when_torch_was_imported_first():
    got = _env_after("import torch\nimport rwkvpy")
    assert got == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}


def test_the_cli_applies_it():
    code = (
        "import os, sys, json\n"
        "from rwkvpy.cli import main\n"
        "try:\n"
        "    main(['info', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps({k: os.environ.get(k) for k in %r}))" % (runtime.WAIT_VARIABLES,)
    )
    p = _run(code)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert all(got[k] == v for k, v in runtime.SETTINGS.items())


def test_apply_on_a_given_mapping():
    # in this test process torch is imported already: apply() sets nothing
    assert "torch" in sys.modules
    env = {}
    assert runtime.apply(env) == {} and env == {}


def test_apply_rules_without_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")
    env = {}
    assert runtime.apply(env) == runtime.SETTINGS and env == runtime.SETTINGS
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert runtime.apply(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "5"}
    assert runtime.apply(env) == {} and env == {"GOMP_SPINCOUNT": "5"}


# -- the thread governor, on a simulated machine (fake clocks and /proc/stat) ------------------
class FakeMachine:
    """2 CPUs; ``run(seconds, own, others)`` advances the clock, this process's CPU time and
    the CPUs' busy time."""

    def __init__(self, monkeypatch, cpus=2):
        self.t = self.own = self.busy = 0.0
        self.cpus = cpus
        monkeypatch.setattr(runtime, "_clock", lambda: self.t)
        monkeypatch.setattr(runtime, "_own_cpu", lambda: self.own)
        monkeypatch.setattr(runtime, "cpu_busy", lambda allowed: (self.busy, self.cpus))

    def run(self, seconds, own, others):
        self.t += seconds
        self.own += own * seconds
        self.busy += (own + others) * seconds


@pytest.fixture
def machine(monkeypatch):
    import torch

    before = torch.get_num_threads()
    yield FakeMachine(monkeypatch)
    torch.set_num_threads(before)


def _ticks(gov, machine, looks, own, others):
    counts = []
    for _ in range(looks):
        machine.run(runtime.WINDOW_S * 1.01, own, others)
        gov.tick()
        counts.append(gov.current)
    return counts


def test_governor_keeps_every_thread_on_a_quiet_machine(machine):
    import torch

    gov = runtime.ThreadGovernor()
    assert gov.start(None, 2) == 2 and gov.active
    assert _ticks(gov, machine, 10, own=2.0, others=0.05) == [2] * 10
    assert torch.get_num_threads() == 2


def test_governor_drops_to_one_thread_beside_a_busy_process_and_comes_back(machine):
    import torch

    gov = runtime.ThreadGovernor()
    gov.start(None, 2)
    # another process busy on a core (it got 2/3 of one beside two spinning threads)
    assert _ticks(gov, machine, 1, own=1.33, others=0.67) == [1]
    assert torch.get_num_threads() == 1
    assert _ticks(gov, machine, 5, own=1.0, others=1.0) == [1] * 5
    # the other process ended: back to 2 after UP_LOOKS looks in a row
    assert _ticks(gov, machine, runtime.UP_LOOKS, own=1.0, others=0.0) == [1] * (
        runtime.UP_LOOKS - 1
    ) + [2]
    assert torch.get_num_threads() == 2


def test_governor_between_looks_does_nothing(machine):
    gov = runtime.ThreadGovernor()
    gov.start(None, 2)
    machine.run(runtime.WINDOW_S / 4, own=1.0, others=2.0)
    gov.tick()
    assert gov.current == 2


def test_governor_leaves_a_users_count_alone(machine):
    import torch

    gov = runtime.ThreadGovernor()
    assert gov.start(2, 2) == 2 and not gov.active  # threads given: fixed
    assert _ticks(gov, machine, 3, own=1.0, others=2.0) == [2, 2, 2]
    gov.start(None, 2)
    torch.set_num_threads(3)  # changed by the user after load: theirs wins from now on
    assert _ticks(gov, machine, 3, own=1.0, others=2.0) == [2, 2, 2]
    assert not gov.active and torch.get_num_threads() == 3


def test_governor_off_with_one_thread_or_without_proc_stat(machine, monkeypatch):
    gov = runtime.ThreadGovernor()
    gov.start(None, 1)
    assert not gov.active

    def no_proc(allowed):
        raise OSError("no /proc/stat")

    monkeypatch.setattr(runtime, "cpu_busy", no_proc)
    gov.start(None, 2)
    assert not gov.active and gov.current == 2


def test_cpu_busy_reads_this_machines_cpus():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    allowed = os.sched_getaffinity(0)
    busy, found = runtime.cpu_busy(allowed)
    assert found == len(allowed) and busy > 0


def test_load_governs_only_a_count_rwkvpy_chooses():
    import torch

    import rwkvpy

    before = torch.get_num_threads()
    try:
        rwkvpy.load("demo", threads=1)
        assert not runtime.GOVERNOR.active
        rwkvpy.load("demo")
        assert runtime.GOVERNOR.active == (rwkvpy.model.physical_cores() > 1)
        assert runtime.GOVERNOR.ceiling == rwkvpy.model.physical_cores()
    finally:
        runtime.GOVERNOR.active = False
        torch.set_num_threads(before)
