"""The strategies by name: the plan's strategy (any but `synthesize`, which the engine runs itself) to the
function that runs it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from mom_service.engine.calls import Calls
from mom_service.engine.concluding import Concluded
from mom_service.engine.events import Breakdown, Event
from mom_service.engine.plan import Plan
from mom_service.engine.strategies.best_of import best_of
from mom_service.engine.strategies.layers import layers
from mom_service.engine.strategies.rank import rank
from mom_service.engine.strategies.vote import vote
from mom_service.engine.tracing import Trace

Strategy = Callable[[Calls, Plan, Breakdown, Trace, Concluded], AsyncGenerator[Event]]

STAGES: dict[str, Strategy] = {"rank": rank, "best_of": best_of, "vote": vote, "layers": layers}


def strategy_of(plan: Plan) -> Strategy:
    """The plan's strategy, for any but `synthesize`."""
    return STAGES[plan.strategy]
