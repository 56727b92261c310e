"""Shared test setup: the one place that finds the fixtures.

Fixtures live in ``$RWKVPY_FIXTURES`` (default ``../shared/fixtures`` next to the repository).
A missing fixture is a failure, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("RWKVPY_FIXTURES", ROOT.parent / "shared" / "fixtures")).resolve()

TINY = FIXTURES / "rwkv-cpp-tiny"
REF = FIXTURES / "reference-pth"
TINY_MODELS = ["4v0-660K", "5v1-730K", "5v2-730K", "6v0-3m", "7v0-834K"]
REF_MODELS = ["v4_c192_l2", "v5_0_c192_l2", "v5_2_c192_l2", "v6_c192_l2", "v7_c192_l2"]


def fixture_path(*parts) -> Path:
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"fixture {p} is missing: set RWKVPY_FIXTURES to the fixtures folder "
                    f"(see ../shared/fixtures/README.md)", pytrace=False)
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
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"fixtures folder {FIXTURES} not found: set RWKVPY_FIXTURES")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures(...)``):
    the tiny models run 3-4x faster so, and no slower on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
