"""The spending limit of a run (`--max-cost-usd`): a piece of work starts only when what was spent, plus the worst
case of the work in flight, plus its own worst case, stays within the limit; once one does not, nothing more
starts."""

from __future__ import annotations

from decimal import Decimal


class Budget:
    def __init__(self, limit: Decimal | None) -> None:
        self.limit = limit
        self.spent = Decimal(0)  # by this run (a resumed run's earlier spending is its own)
        self.reserved = Decimal(0)  # the worst case of the work in flight
        self.stopped = False

    def admit(self, worst: Decimal | None) -> bool:
        """Whether work of this worst case may start (None: unknown, refused under a limit); reserved if so."""
        if self.stopped:
            return False
        if self.limit is not None:
            if worst is None or self.spent + self.reserved + worst > self.limit:
                self.stopped = True
                return False
            self.reserved += worst
        return True

    def settle(self, worst: Decimal | None, cost: Decimal | None) -> None:
        """Work admitted with `worst` has ended, having cost `cost` (None: unknown, counted as its worst case)."""
        if self.limit is not None and worst is not None:
            self.reserved -= worst
        spent = cost if cost is not None else worst
        self.spent += spent if spent is not None else Decimal(0)
