"""Sparsity schedules: hand-computed progress, validation, pickling, monotonicity (hypothesis)."""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.pruning.schedules import (
    AGP,
    Constant,
    Cosine,
    Exponential,
    Linear,
    Schedule,
    compounding_amounts,
    sparsity_at,
)

SCHEDULES = (Linear, AGP, Exponential, Cosine)


def test_linear_steps_on_frequency_multiples_from_start() -> None:
    schedule = Linear(start=2, end=8, frequency=2)
    assert [schedule.progress(t) for t in range(10)] == [0, 0, 0, 0, 2 / 6, 2 / 6, 4 / 6, 4 / 6, 1, 1]


def test_agp_matches_zhu_gupta_formula() -> None:
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 with s_i = 0, s_f = 0.9, t0 = 10, dt = 5, n = 4
    schedule = AGP(start=10, end=30, frequency=5, unit="step")
    for t in range(10, 31, 5):
        expected = 0.9 + (0.0 - 0.9) * (1 - (t - 10) / 20) ** 3
        assert sparsity_at(schedule, 0.9, t) == pytest.approx(expected, abs=1e-12)
    assert sparsity_at(schedule, 0.9, 14) == 0.0  # held until the next multiple of dt
    assert sparsity_at(schedule, 0.9, 17) == pytest.approx(0.9 * (1 - 0.75**3))


def test_exponential_and_cosine_values() -> None:
    assert Cosine(start=0, end=4).progress(1) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert Exponential(start=0, end=4, rate=1.0).progress(2) == pytest.approx((1 - math.exp(-0.5)) / (1 - math.exp(-1)))


def test_constant_is_one_shot() -> None:
    schedule = Constant(start=3)
    assert [schedule.progress(t) for t in range(5)] == [0, 0, 0, 1, 1]
    assert schedule.end == 3 and schedule.is_update(3) and not schedule.is_update(4)


def test_end_equal_to_start_jumps() -> None:
    assert [AGP(start=2, end=2).progress(t) for t in (1, 2, 3)] == [0, 1, 1]


@pytest.mark.parametrize("cls", [*SCHEDULES, Constant])
def test_pickle_roundtrip_and_equality(cls: type[Schedule]) -> None:
    schedule = cls(start=1, end=5, frequency=2, unit="step")
    assert pickle.loads(pickle.dumps(schedule)) == schedule


def test_invalid_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"ends before it starts: start=5, end=3"):
        Linear(start=5, end=3)
    with pytest.raises(ValueError, match=r"frequency=0"):
        AGP(frequency=0)
    with pytest.raises(ValueError, match=r"unit='batch'"):
        Cosine(unit="batch")
    with pytest.raises(ValueError, match=r"rate=0"):
        Exponential(rate=0)
    with pytest.raises(ValueError, match=r"start=-1"):
        Linear(start=-1)
    with pytest.raises(ValueError, match=r"1.0"):
        sparsity_at(Linear(), 1.0, 3)


def test_compounding_amounts_reach_the_targets() -> None:
    targets = [sparsity_at(AGP(start=0, end=5), 0.9, t) for t in range(1, 6)]
    remaining = 1.0
    for amount, target in zip(compounding_amounts(targets), targets, strict=True):
        remaining *= 1 - amount
        assert 1 - remaining == pytest.approx(target)
    assert compounding_amounts([0.5, 0.75]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="must not decrease"):
        compounding_amounts([0.5, 0.4])


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    cls=st.sampled_from(SCHEDULES),
    start=st.integers(0, 20),
    length=st.integers(0, 30),
    frequency=st.integers(1, 7),
)
def test_progress_is_monotone_and_reaches_one(cls: type[Schedule], start: int, length: int, frequency: int) -> None:
    schedule = cls(start=start, end=start + length, frequency=frequency)
    values = [schedule.progress(t) for t in range(start + length + 3)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[start + length] == 1.0 and (start == 0 or values[start - 1] == 0.0)
    changes = [t for t in range(1, len(values)) if values[t] != values[t - 1]]
    assert all((t - start) % frequency == 0 or t == start + length for t in changes)
