"""Shared test setup: the one place that finds the fixtures.

Fixtures live in ``tests/fixtures`` (in the repository: see its README for their origin), or in
``$RWKVPY_FIXTURES`` when set. A missing fixture is a failure, never a skip.

Tests marked ``fast`` are the fast tier (``python -m pytest -m fast``): they need only the
installed package (its demo model, random models from ``rwkvpy.synth``), so the tier runs
without the fixtures folder, and :func:`fixture_path` fails inside them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A first run's second process (rwkvpy.coldstart) compiles a model's kernels for the runs that
# follow; the suite's processes compile what they run themselves, so that a test's time and
# load do not depend on others (tests/test_coldstart.py turns it on where it tests it).
os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")
FIXTURES = Path(os.environ.get("RWKVPY_FIXTURES", ROOT / "tests" / "fixtures")).resolve()

TINY = FIXTURES / "rwkv-cpp-tiny"
REF = FIXTURES / "reference-pth"
TINY_MODELS = ["4v0-660K", "5v1-730K", "5v2-730K", "6v0-3m", "7v0-834K"]
#: rwkv.cpp's tiny trained v7 byte model: the suite's default small real model
TINY_V7 = ("rwkv-cpp-tiny", "tiny-rwkv-7v0-834K-FP32.bin")
REF_MODELS = ["v4_c192_l2", "v5_0_c192_l2", "v5_2_c192_l2", "v6_c192_l2", "v7_c192_l2"]


#: Whether the test being set up is in the fast tier (marked ``fast``): it may not use fixtures.
_fast_test = False


def pytest_runtest_setup(item):
    global _fast_test
    _fast_test = item.get_closest_marker("fast") is not None


def fixture_path(*parts) -> Path:
    if _fast_test:
        pytest.fail(
            "a test marked fast needs only the package: it may not read tests/fixtures "
            f"({'/'.join(map(str, parts))}); remove its mark or its fixture",
            pytrace=False,
        )
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"fixture {p} is missing (see tests/fixtures/README.md)", pytrace=False)
    return p


def serial_logits(model, tokens, state=None):
    """The logits of each token fed one at a time, state carried: (T, vocab) float32 on the
    CPU, and the final state."""
    import torch

    out = []
    for tok in tokens:
        lg, state = model.forward([tok], state)
        out.append(lg.float().cpu())
    return torch.stack(out), state


def pytest_sessionstart(session):
    # the repack cache of the suite's loads goes to a folder of its own, not the user's; numba's
    # compiled kernels stay in the user's (compiling them again in every session takes minutes)
    import tempfile

    from rwkvpy.paths import user_cache_dir

    os.environ.setdefault("NUMBA_CACHE_DIR", user_cache_dir("numba"))
    os.environ["RWKVPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="rwkvpy-test-cache-")
    if not FIXTURES.is_dir() and session.config.option.markexpr != "fast":  # the fast tier
        raise pytest.UsageError(f"fixtures folder {FIXTURES} not found: set RWKVPY_FIXTURES")


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """Every test module leaves torch's process-wide thread count as it found it
    (``rwkvpy.load(threads=N)`` and the CLI's ``--threads`` set it)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Spy:
    """A model that records the number of tokens of every forward call (``calls``);
    ``interrupt_at``: raise KeyboardInterrupt instead of running the n-th call (from 1)."""

    def __init__(self, model, interrupt_at=None):
        self.model, self.calls, self.interrupt_at = model, [], interrupt_at

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, tokens, state=None, all_logits=False):
        if self.interrupt_at is not None and len(self.calls) + 1 == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        self.calls.append(len(tokens))
        return self.model.forward(tokens, state, all_logits=all_logits)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures(...)``):
    the tiny models run 3-4x faster so, and no slower on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the server tests' clients (tests/servers.py) ----------------------------------------------
@pytest.fixture(scope="module")
def api_key():
    """The API key a module's ``server`` fixture demands (None: none); a module overrides it."""
    return None


@pytest.fixture(scope="module")
def client(server, api_key):
    """The official ``openai`` client on the module's ``server`` fixture."""
    from servers import openai_client

    with openai_client(server, api_key) as c:
        yield c


@pytest.fixture(scope="module")
def http(server, api_key):
    """An httpx client on the module's ``server`` fixture, with its API key."""
    from servers import http_client

    with http_client(server, api_key) as c:
        yield c
