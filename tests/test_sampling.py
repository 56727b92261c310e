"""SamplingParams validation and Sampler behaviour on small hand-made logits."""

import math

import numpy as np
import pytest
import torch

from rwkvpy.errors import RwkvpyError
from rwkvpy.sampling import Sampler, SamplingError, SamplingParams

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)


def probs_to_logits(p):
    return torch.log(torch.tensor(p, dtype=torch.float32))


# -- SamplingParams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"presence_penalty": math.inf}, "presence_penalty"),
        ({"frequency_penalty": None}, "frequency_penalty"),
        ({"penalty_decay": 0.0}, "penalty_decay"),
        ({"penalty_decay": 1.01}, "penalty_decay"),
        ({"logit_bias": {1: math.nan}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"banned_tokens": [1, -2]}, "banned_tokens"),
        ({"banned_tokens": "abc"}, "banned_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_tokens": [1.0]}, "stop_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": "x"}, "seed"),
        ({"greedy": 1}, "greedy"),
    ],
)
def test_params_rejected_with_clear_message(kwargs, field):
    with pytest.raises(SamplingError, match=field) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, RwkvpyError) and isinstance(e.value, ValueError)


def test_params_normalized():
    p = SamplingParams(
        stop="\n\n",
        stop_tokens=0,
        banned_tokens=[3, 4],
        logit_bias={5: -math.inf},
        temperature=1,
        top_k=np.int64(3),
    )
    assert p.stop == ("\n\n",) and p.stop_tokens == (0,) and p.banned_tokens == (3, 4)
    assert p.logit_bias == {5: -math.inf} and p.temperature == 1.0 and p.top_k == 3
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(greedy=True).is_greedy
    assert not SamplingParams().is_greedy
    with pytest.raises(AttributeError):
        p.temperature = 2.0  # frozen: a checked value stays checked


# -- greedy, bias, bans --------------------------------------------------------------------


def test_greedy_is_argmax_lowest_id_on_tie():
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0])
    for p in (SamplingParams(temperature=0), SamplingParams(greedy=True, temperature=5)):
        s = Sampler(p)
        assert s.sample(logits) == 1
        assert s.distribution(logits).tolist() == [0, 1, 0, 0]


def test_logit_bias_and_banned_tokens():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert Sampler(SamplingParams(greedy=True, logit_bias={0: 10.0})).sample(logits) == 0
    assert Sampler(SamplingParams(greedy=True, banned_tokens=[3])).sample(logits) == 2
    assert Sampler(SamplingParams(greedy=True, logit_bias={3: -math.inf})).sample(logits) == 2
    d = Sampler(SamplingParams(banned_tokens=[3, 0])).distribution(logits)
    expected = torch.softmax(torch.tensor([2.0, 3.0], dtype=torch.float64), 0)
    assert torch.allclose(d, torch.tensor([0, expected[0], expected[1], 0], dtype=torch.float64))
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # the caller's logits are never changed
    with pytest.raises(SamplingError, match="-inf"):
        Sampler(SamplingParams(banned_tokens=[0, 1, 2, 3])).sample(logits)
    with pytest.raises(SamplingError, match="out of range"):
        Sampler(SamplingParams(banned_tokens=[4])).sample(logits)
    with pytest.raises(SamplingError, match="out of range"):
        Sampler(SamplingParams(logit_bias={9: 1.0})).sample(logits)


def test_bad_logits():
    with pytest.raises(SamplingError, match="NaN"):
        Sampler().sample(torch.tensor([0.0, math.nan]))
    with pytest.raises(SamplingError, match="shape"):
        Sampler().sample(torch.zeros(2, 3))
    s = Sampler()
    s.sample(torch.zeros(4))
    with pytest.raises(SamplingError, match="4"):
        s.sample(torch.zeros(5))


# -- distributions -------------------------------------------------------------------------

P = [0.5, 0.3, 0.15, 0.05]


def test_temperature():
    logits = probs_to_logits(P)
    d = Sampler(SamplingParams(temperature=2.0)).distribution(logits)
    expected = torch.softmax(logits.double() / 2.0, 0)
    assert torch.allclose(d, expected, atol=1e-7)
    assert torch.allclose(
        Sampler().distribution(logits), torch.tensor(P, dtype=torch.float64), atol=1e-6
    )


def test_top_k_top_p_min_p():
    logits = probs_to_logits(P)

    def dist(**kw):
        return Sampler(SamplingParams(**kw)).distribution(logits).tolist()

    assert dist(top_k=2) == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=1e-6)
    assert dist(top_k=1) == pytest.approx([1, 0, 0, 0])
    assert dist(top_k=10) == pytest.approx(P, abs=1e-6)
    # top_p keeps the most probable tokens until their mass reaches top_p
    assert dist(top_p=0.75) == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=1e-6)
    assert dist(top_p=0.9) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], abs=1e-6)
    assert dist(top_p=0.1) == pytest.approx([1, 0, 0, 0])
    # min_p drops tokens below min_p * the largest probability
    assert dist(min_p=0.4) == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=1e-6)
    assert dist(min_p=0.2) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], abs=1e-6)
    # top_k first, then top_p on the renormalized rest: [0.5, 0.3, 0.15] / 0.95
    assert dist(top_k=3, top_p=0.6) == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=1e-6)


def test_draws_follow_the_distribution():
    logits = probs_to_logits(P)
    s = Sampler(SamplingParams(seed=123))
    n = 4000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=4) / n
    assert np.abs(counts - P).max() < 0.03, counts
    s = Sampler(SamplingParams(seed=5, top_k=2))
    assert {s.sample(logits) for _ in range(200)} == {0, 1}


# -- penalties -----------------------------------------------------------------------------


def test_penalties_hand_computed():
    """presence 0.5, frequency 0.25, decay 0.5, tokens 3, 3, 1 recorded in this order:
    counts after 3: {3: 1}; after 3: {3: 0.5 + 1 = 1.5}; after 1: {3: 0.75, 1: 1}.
    Penalty = presence + frequency * count: token 3: 0.5 + 0.1875, token 1: 0.5 + 0.25."""
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, penalty_decay=0.5)
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = Sampler(p)
    assert s.process(logits).tolist() == [1.0, 2.0, 3.0, 4.0]
    s.record(3)
    assert s.process(logits).tolist() == [1.0, 2.0, 3.0, 4.0 - 0.75]
    s.record(3)
    assert s.process(logits).tolist() == [1.0, 2.0, 3.0, 4.0 - (0.5 + 0.25 * 1.5)]
    s.record(1)
    expected = [1.0, 2.0 - 0.75, 3.0, 4.0 - (0.5 + 0.25 * 0.75)]
    assert s.process(logits).tolist() == expected
    d = s.distribution(logits)
    assert torch.allclose(d, torch.softmax(torch.tensor(expected, dtype=torch.float64), 0))
    s.reset()
    assert s.process(logits).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_presence_does_not_decay():
    s = Sampler(SamplingParams(presence_penalty=1.0, penalty_decay=0.1))
    logits = torch.zeros(3)
    s.process(logits)
    s.record(2)
    for _ in range(20):
        s.record(0)
    assert s.process(logits)[2].item() == -1.0


def test_sample_records_and_penalizes_repeats():
    logits = torch.tensor([5.0, 4.9, 4.8, 0.0])
    s = Sampler(SamplingParams(greedy=True, presence_penalty=1.0, penalty_decay=1.0))
    assert [s.sample(logits) for _ in range(3)] == [0, 1, 2]
    plain = Sampler(SamplingParams(greedy=True))
    assert [plain.sample(logits) for _ in range(3)] == [0, 0, 0]


# -- determinism ---------------------------------------------------------------------------


def test_same_seed_same_draws_and_global_rng_untouched():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(99)
    before = torch.get_rng_state()
    params = SamplingParams(seed=42, temperature=1.3, top_p=0.95, frequency_penalty=0.1)
    a = Sampler(params)
    b = Sampler(params)
    seq_a = [a.sample(logits) for _ in range(50)]
    assert seq_a == [b.sample(logits) for _ in range(50)]
    assert torch.equal(torch.get_rng_state(), before)
    c = Sampler(SamplingParams(seed=43, temperature=1.3, top_p=0.95, frequency_penalty=0.1))
    assert [c.sample(logits) for _ in range(50)] != seq_a
    a.reset()
    assert [a.sample(logits) for _ in range(50)] == seq_a
    r = Sampler(SamplingParams())
    assert Sampler(SamplingParams(seed=r.seed)).sample(logits) == r.sample(logits)


def test_numpy_logits_accepted():
    assert Sampler(SamplingParams(greedy=True)).sample(np.array([0.0, 2.0, 1.0], np.float32)) == 1
