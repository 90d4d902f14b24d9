"""A circuit breaker per LLM: after N consecutive failures it is skipped for a cool-down, then one probe decides.

States, per LLM:

    closed     calls go through; a failure counts, a success resets the count; N in a row open the circuit
    open       calls are refused (the member is `skipped`, reason `circuit_open`) until the cool-down has passed
    half_open  the cool-down has passed: the next call is the one probe; the others are refused while it runs.
               The probe succeeding closes the circuit; failing opens it for another cool-down; cancelled (cut off
               by a quorum, a client gone) decides nothing, and the next call probes again.

Only failures that say something about the provider count (timeouts, 429, 5xx, connection errors): a 400 caused by
the request, a missing key or a cancelled call does not. The state lives in the process: each replica keeps its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]
CIRCUIT_STATES: tuple[CircuitState, ...] = ("closed", "open", "half_open")
Result = Literal["success", "failure", "abandoned"]


@dataclass(slots=True)
class _Circuit:
    failures: int = 0  # consecutive failures while closed
    opened_at: float | None = None  # None: closed
    probing: bool = False  # the one probe of a half-open circuit is running
    opened: int = 0  # how many times this circuit opened (for the metrics)


@dataclass(slots=True, frozen=True)
class Permit:
    """Leave to make one call; hand it back with the call's result."""

    name: str
    probe: bool = False


@dataclass(slots=True, frozen=True)
class CircuitView:
    state: CircuitState
    consecutive_failures: int
    opened: int
    retry_in_s: float | None  # open: seconds until a probe may go


class CircuitBreakers:
    """One circuit per LLM name. `failures` 0 turns the breakers off (every call goes through)."""

    def __init__(
        self,
        names: Iterable[str],
        *,
        failures: int = 5,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._circuits = {name: _Circuit() for name in names}

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def carry_over(self, before: CircuitBreakers, names: Iterable[str]) -> None:
        """After a config reload: these LLMs (their definitions unchanged) keep the circuits they had in `before`,
        shared, so that the calls still running under the old config count on them too. The others start closed."""
        for name in names:
            circuit = before._circuits.get(name)
            if circuit is not None and name in self._circuits:
                self._circuits[name] = circuit

    def allow(self, name: str) -> Permit | None:
        """A permit for one call now, or None when the circuit is open (or half-open with its probe running)."""
        circuit = self._circuits.get(name)
        if circuit is None or not self.enabled or circuit.opened_at is None:
            return Permit(name)
        if circuit.probing or self._clock() - circuit.opened_at < self.cooldown_s:
            return None
        circuit.probing = True
        return Permit(name, probe=True)

    def record(self, permit: Permit, result: Result) -> None:
        """The result of a call made with `permit`."""
        circuit = self._circuits.get(permit.name)
        if circuit is None or not self.enabled:
            return
        if permit.probe:
            circuit.probing = False
            if result == "success":
                circuit.failures, circuit.opened_at = 0, None
            elif result == "failure":
                circuit.opened_at = self._clock()  # another cool-down
                circuit.opened += 1
            return
        if circuit.opened_at is not None:
            return  # a call that started before the circuit opened: only the probe decides now
        if result == "success":
            circuit.failures = 0
        elif result == "failure":
            circuit.failures += 1
            if circuit.failures >= self.threshold:
                circuit.opened_at = self._clock()
                circuit.opened += 1

    def view(self, name: str) -> CircuitView:
        circuit = self._circuits.get(name) or _Circuit()
        if circuit.opened_at is None:
            return CircuitView("closed", circuit.failures, circuit.opened, None)
        remaining = self.cooldown_s - (self._clock() - circuit.opened_at)
        state: CircuitState = "open" if remaining > 0 else "half_open"
        return CircuitView(state, circuit.failures, circuit.opened, round(max(remaining, 0.0), 1))

    def names(self) -> list[str]:
        return list(self._circuits)

    def reason(self, name: str) -> str:
        """Why a call was refused, for the breakdown and the trace."""
        view = self.view(name)
        if view.state == "open" and view.retry_in_s is not None:
            return f"circuit open after {self.threshold} consecutive failures: next try in {view.retry_in_s:g} s"
        return f"circuit open after {self.threshold} consecutive failures: a probe call is running"
