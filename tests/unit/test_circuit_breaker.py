"""The circuit breaker's logic on its own, with a clock the tests move: closed -> open -> half_open -> closed/open."""

from __future__ import annotations

import pytest

from mom_service.providers.circuit_breaker import CircuitBreakers, CircuitView, Permit, Result

COOLDOWN = 30.0


class Clock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breakers(clock: Clock, failures: int = 3, cooldown_s: float = COOLDOWN) -> CircuitBreakers:
    return CircuitBreakers(["a", "b"], failures=failures, cooldown_s=cooldown_s, clock=clock)


def call(cb: CircuitBreakers, name: str, result: Result) -> Permit:
    """One call that was let through and ended with `result`."""
    permit = cb.allow(name)
    assert permit is not None, f"{name}: refused"
    cb.record(permit, result)
    return permit


def open_circuit(cb: CircuitBreakers, name: str = "a") -> None:
    for _ in range(cb.threshold):
        call(cb, name, "failure")
    assert cb.view(name).state == "open"


@pytest.mark.parametrize("threshold", [1, 2, 3, 5])
def test_opens_after_exactly_n_consecutive_failures(clock: Clock, threshold: int) -> None:
    cb = breakers(clock, failures=threshold)
    for done in range(1, threshold):
        call(cb, "a", "failure")
        assert cb.view("a") == CircuitView("closed", done, 0, None)
        assert cb.allow("a") == Permit("a")  # still closed: an ordinary call, not a probe
    call(cb, "a", "failure")
    assert cb.view("a") == CircuitView("open", threshold, 1, COOLDOWN)
    assert cb.allow("a") is None
    assert cb.view("b") == CircuitView("closed", 0, 0, None)  # one circuit per LLM
    assert cb.allow("b") == Permit("b")


def test_a_success_in_between_resets_the_count(clock: Clock) -> None:
    cb = breakers(clock, failures=3)
    for _ in range(4):  # 2 failures, a success: never 3 in a row
        call(cb, "a", "failure")
        call(cb, "a", "failure")
        assert cb.view("a").consecutive_failures == 2
        call(cb, "a", "success")
        assert cb.view("a") == CircuitView("closed", 0, 0, None)
    call(cb, "a", "failure")
    call(cb, "a", "failure")
    call(cb, "a", "failure")
    assert cb.view("a").state == "open"


def test_abandoned_calls_neither_count_nor_reset(clock: Clock) -> None:
    cb = breakers(clock, failures=3)
    for _ in range(10):
        call(cb, "a", "abandoned")
    assert cb.view("a") == CircuitView("closed", 0, 0, None)
    call(cb, "a", "failure")
    call(cb, "a", "failure")
    call(cb, "a", "abandoned")  # a cancelled call (or a 400) says nothing about the provider
    assert cb.view("a") == CircuitView("closed", 2, 0, None)
    call(cb, "a", "failure")
    assert cb.view("a").state == "open"


def test_open_refuses_every_call_until_the_cool_down_has_passed(clock: Clock) -> None:
    cb = breakers(clock)
    open_circuit(cb)
    for _ in range(5):
        assert cb.allow("a") is None
    clock.advance(COOLDOWN - 0.01)
    assert cb.allow("a") is None
    assert cb.view("a").state == "open"
    clock.advance(0.01)
    assert cb.view("a").state == "half_open"
    assert cb.allow("a") == Permit("a", probe=True)


def test_half_open_gives_exactly_one_probe_permit(clock: Clock) -> None:
    cb = breakers(clock)
    open_circuit(cb)
    clock.advance(COOLDOWN + 100)  # long past the cool-down: still one probe
    probe = cb.allow("a")
    assert probe == Permit("a", probe=True)
    for _ in range(5):
        assert cb.allow("a") is None  # concurrent requests keep skipping it while the probe runs
    assert cb.view("a") == CircuitView("half_open", 3, 1, 0.0)
    assert "a probe call is running" in cb.reason("a")
    assert cb.allow("b") == Permit("b")


def test_probe_success_closes_the_circuit(clock: Clock) -> None:
    cb = breakers(clock)
    open_circuit(cb)
    clock.advance(COOLDOWN)
    probe = cb.allow("a")
    assert probe is not None and probe.probe
    cb.record(probe, "success")
    assert cb.view("a") == CircuitView("closed", 0, 1, None)
    assert cb.allow("a") == Permit("a")
    assert cb.allow("a") == Permit("a")  # every call goes through again, none of them a probe
    call(cb, "a", "failure")
    call(cb, "a", "failure")
    assert cb.view("a").state == "closed"  # the count starts again from zero
    call(cb, "a", "failure")
    assert cb.view("a") == CircuitView("open", 3, 2, COOLDOWN)


def test_probe_failure_reopens_for_another_cool_down(clock: Clock) -> None:
    cb = breakers(clock)
    open_circuit(cb)
    assert cb.view("a").opened == 1
    clock.advance(COOLDOWN + 5)
    probe = cb.allow("a")
    assert probe is not None and probe.probe
    clock.advance(2)  # the probe took a while: the new cool-down counts from its failure
    cb.record(probe, "failure")
    assert cb.view("a") == CircuitView("open", 3, 2, COOLDOWN)
    clock.advance(COOLDOWN - 1)
    assert cb.allow("a") is None
    clock.advance(1)
    probe = cb.allow("a")
    assert probe is not None and probe.probe
    cb.record(probe, "failure")
    assert cb.view("a").opened == 3
    clock.advance(COOLDOWN)
    call(cb, "a", "success")
    assert cb.view("a") == CircuitView("closed", 0, 3, None)


def test_an_abandoned_probe_decides_nothing_and_the_next_call_probes(clock: Clock) -> None:
    cb = breakers(clock)
    open_circuit(cb)
    clock.advance(COOLDOWN)
    probe = cb.allow("a")
    assert probe is not None and probe.probe
    assert cb.allow("a") is None
    cb.record(probe, "abandoned")  # cut off by a quorum, or the client left
    assert cb.view("a") == CircuitView("half_open", 3, 1, 0.0)
    again = cb.allow("a")
    assert again == Permit("a", probe=True)
    assert cb.allow("a") is None
    cb.record(again, "success")
    assert cb.view("a").state == "closed"


def test_results_of_calls_started_before_opening_are_ignored(clock: Clock) -> None:
    cb = breakers(clock, failures=2)
    early = [p for p in (cb.allow("a") for _ in range(4)) if p is not None]  # four calls in flight at once
    assert early == [Permit("a")] * 4
    cb.record(early[0], "failure")
    cb.record(early[1], "failure")
    assert cb.view("a") == CircuitView("open", 2, 1, COOLDOWN)
    cb.record(early[2], "success")  # late news: only a probe decides now
    assert cb.view("a") == CircuitView("open", 2, 1, COOLDOWN)
    assert cb.allow("a") is None
    clock.advance(COOLDOWN)
    probe = cb.allow("a")
    assert probe is not None and probe.probe
    cb.record(early[3], "failure")  # nor does it re-open the circuit, nor count twice
    assert cb.view("a") == CircuitView("half_open", 2, 1, 0.0)
    assert cb.allow("a") is None  # the probe is still running
    cb.record(probe, "success")
    assert cb.view("a") == CircuitView("closed", 0, 1, None)


def test_failures_zero_turns_the_breakers_off(clock: Clock) -> None:
    cb = breakers(clock, failures=0)
    assert not cb.enabled
    for _ in range(50):
        assert call(cb, "a", "failure") == Permit("a")
    assert cb.view("a") == CircuitView("closed", 0, 0, None)


def test_unknown_llms_always_go_through(clock: Clock) -> None:
    cb = breakers(clock, failures=1)
    for _ in range(3):
        call(cb, "nobody", "failure")
    assert cb.allow("nobody") == Permit("nobody")
    assert cb.view("nobody") == CircuitView("closed", 0, 0, None)
    assert cb.names() == ["a", "b"]


def test_view_counts_down_retry_in_s_and_reason_says_when(clock: Clock) -> None:
    cb = breakers(clock, failures=2)
    call(cb, "a", "failure")
    assert cb.view("a") == CircuitView("closed", 1, 0, None)
    call(cb, "a", "failure")
    assert cb.view("a").retry_in_s == 30.0
    assert cb.reason("a") == "circuit open after 2 consecutive failures: next try in 30 s"
    clock.advance(12.34)
    assert cb.view("a") == CircuitView("open", 2, 1, 17.7)  # rounded to a tenth
    assert cb.reason("a") == "circuit open after 2 consecutive failures: next try in 17.7 s"
    clock.advance(17.66)
    assert cb.view("a") == CircuitView("half_open", 2, 1, 0.0)
    clock.advance(1000)
    assert cb.view("a") == CircuitView("half_open", 2, 1, 0.0)  # never negative


def test_the_real_clock_is_the_default() -> None:
    cb = CircuitBreakers(["a"], failures=1, cooldown_s=60)
    call(cb, "a", "failure")
    view = cb.view("a")
    assert view.state == "open"
    assert view.retry_in_s is not None and 59 <= view.retry_in_s <= 60
