"""The shared timing loop: what it runs, in which order, and which interval it attributes to which call."""
import os

import pytest

from dsnet import timing


class FakeClock:
    """perf_counter replaced by a clock that only the calls advance, each by its own fixed cost."""

    def __init__(self):
        self.now = 0.0
        self.log: list[str] = []

    def perf_counter(self) -> float:
        return self.now

    def call(self, name: str, cost: float):
        def run():
            self.log.append(name)
            self.now += cost
        return run


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake.perf_counter)
    return fake


def test_each_call_gets_its_own_interval(clock):
    medians = timing.median_seconds([clock.call("a", 3.0), clock.call("b", 5.0), clock.call("c", 0.25)],
                                    repeats=5, warmup=2)
    assert medians == [3.0, 5.0, 0.25]


def test_warmup_runs_untimed_and_the_order_alternates(clock):
    timing.median_seconds([clock.call("a", 1.0), clock.call("b", 1.0)], repeats=4, warmup=1)
    assert clock.log == ["a", "b",                # warm-up
                         "a", "b", "b", "a",      # repeats 0 and 1
                         "a", "b", "b", "a"]      # repeats 2 and 3


def test_the_median_ignores_a_single_burst(clock):
    costs = iter([1.0, 1.0, 9.0, 1.0, 1.0])

    def bursty():
        clock.now += next(costs)

    assert timing.median_seconds([bursty], repeats=5, warmup=0) == [1.0]


def test_no_repeats_is_an_error():
    with pytest.raises(ValueError, match="repeats"):
        timing.median_seconds([lambda: None], repeats=0, warmup=0)


def test_reserve_kernel_cache_sets_onednn_capacity_and_keeps_a_users_value(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    timing.reserve_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8192"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "300")
    timing.reserve_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "300"
