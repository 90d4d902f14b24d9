"""API keys on the requests' path (docs/keys.md): who a key is, its rate limits, the MoM models it may use, its budget.

Refusals come before any upstream call: a disabled, expired or unknown key is a 401 (api/auth.py), over its rate a
429 `rate_limit_exceeded` (before the body is read), a MoM model it may not use a 403 `model_not_allowed` (before
the plan), over its budget a 429 `budget_exceeded` (after the plan, whose worst case counts: `spent + worst case >
budget` is refused, so a request cannot overshoot by more than its own worst case). Static API_TOKEN callers have
no key: nothing here reads the database for them.

A key's record is cached for MOM_KEY_CACHE_SECONDS per replica (a change made on another replica takes effect here
within that time; on this one at once), and kept while the database does not answer. Spend: usage/spend.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal

from mom_service.api.rate_limits import Limits, RateLimits
from mom_service.api.schemas.keys import iso_ms
from mom_service.engine.cost_cap import usd, worst_case
from mom_service.engine.engine import Engine
from mom_service.engine.events import KeyLabel, RequestOutcome
from mom_service.engine.plan import Plan
from mom_service.errors import AuthenticationFailed, BudgetExceeded, Forbidden, InvalidRequest, ServiceUnavailable
from mom_service.settings import Settings
from mom_service.usage.keys import ApiKey, KeyStore, KeyStoreUnavailable, hash_key
from mom_service.usage.spend import SpendTracker, SpendUnavailable, period_bounds

MAX_CACHED_KEYS = 10_000  # key records (and unknown keys) cached per replica
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: their identity (a hash of their token: the cache's owner, stored responses' owner, usage records'
    `caller`) and their key's record (None: a static API_TOKEN)."""

    id: str
    key: ApiKey | None = None

    @property
    def label(self) -> KeyLabel | None:
        return KeyLabel(self.key.id, self.key.name) if self.key is not None else None

    @property
    def limit_id(self) -> str:
        """Whose rate limits a request counts against: the key's (by its id), else the token's."""
        return f"key:{self.key.id}" if self.key is not None else self.id


def usable(key: ApiKey, now_ms: int) -> ApiKey:
    """The key, unless it is disabled or expired (401)."""
    if key.disabled:
        raise AuthenticationFailed("This API key is disabled.", headers=_CHALLENGE)
    if key.expires_ms is not None and key.expired(now_ms):
        raise AuthenticationFailed(f"This API key expired at {iso_ms(key.expires_ms)}.", headers=_CHALLENGE)
    return key


class KeyGate:
    """The keys' checks, with this replica's caches of key records (store), spend (spend) and limits (limits)."""

    def __init__(self, store: KeyStore, spend: SpendTracker, limits: RateLimits, settings: Settings) -> None:
        self.store = store
        self.spend = spend
        self.limits = limits
        self._ttl_s = settings.mom_key_cache_seconds
        self._default_rpm = settings.mom_rate_limit_rpm or None
        self._records: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()  # hash -> record, read at
        self._tpm: dict[str, int | None] = {}  # key id -> its tokens per minute, as last read
        self._locks: dict[str, asyncio.Lock] = {}  # key id -> its budget's check and reservation, one at a time
        self._counting: set[asyncio.Task[None]] = set()

    async def key_of(self, token: bytes) -> ApiKey | None:
        """The record of the key `token` is (None: no such key), cached; 503 when the database does not answer and
        this replica has not read it before."""
        digest = hash_key(token)
        cached = self._records.get(digest)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self._ttl_s:
            self._records.move_to_end(digest)
            return cached[0]
        try:
            record = await self.store.by_hash(digest)
        except KeyStoreUnavailable:
            if cached is not None:
                return cached[0]  # the last record read, while the database does not answer
            raise ServiceUnavailable(
                "API keys cannot be checked now: the usage database is not answering. Retry shortly.",
                code="keys_unavailable",
            ) from None
        self._records[digest] = (record, now)
        self._records.move_to_end(digest)
        while len(self._records) > MAX_CACHED_KEYS:
            self._records.popitem(last=False)
        if record is not None:
            self._tpm[record.id] = record.tpm_limit
        return record

    def forget(self, key_id: str) -> None:
        """A key changed on this replica: its record is read again at its next use."""
        for digest in [d for d, (record, _) in self._records.items() if record is not None and record.id == key_id]:
            del self._records[digest]

    async def admit_rate(self, caller: Caller) -> dict[str, str]:
        """The caller's request counted against its per-minute limits (429 when over): the key's own, else
        MOM_RATE_LIMIT_RPM. Returns the rate-limit headers of its answer."""
        key = caller.key
        if key is None:
            limits = Limits(rpm=self._default_rpm)
        else:
            limits = Limits(rpm=key.rpm_limit or self._default_rpm, tpm=key.tpm_limit)
        if limits.rpm is None and limits.tpm is None:
            return {}
        return await self.limits.admit(caller.limit_id, limits, "API key" if key is not None else "API token")

    @staticmethod
    def allow_model(caller: Caller, model: str) -> None:
        """403 when the caller's key may not use this MoM model."""
        if caller.key is not None and not caller.key.allows(model):
            raise Forbidden(f"This API key may not use the model '{model}'.", code="model_not_allowed", param="model")

    async def admit_spend(self, caller: Caller, plan: Plan, engine: Engine) -> None:
        """Under the key's budget, the plan is admitted only when what the key spent in the period plus the plan's
        worst case stays within it (429 else); its worst case is then reserved until its outcome is recorded."""
        key = caller.key
        if key is None or key.budget_usd is None:
            return
        worst = worst_case(plan, engine.calls.prices, engine.ceilings)
        if worst is None:
            raise InvalidRequest(
                f"This API key has a budget, and the model '{plan.mom.name}' may call an LLM with no known price: "
                "its cost could not be counted. Add `pricing` to that LLM's entry in config.yaml.",
                code="budget_unpriced",
                param="model",
            )
        now = time.time()
        start_ms, end_ms = period_bounds(key.period, now)
        async with self._locks.setdefault(key.id, asyncio.Lock()):
            try:
                spent = await self.spend.spent(key.id, start_ms, key.budget_usd, worst)
            except SpendUnavailable:
                raise ServiceUnavailable(
                    "This API key's spending cannot be checked now: the usage database is not answering.",
                    code="budget_unavailable",
                ) from None
            if spent + worst > key.budget_usd:
                raise _over_budget(key, key.budget_usd, spent, worst, end_ms, now)
            self.spend.reserve(key.id, plan.request_id, worst)

    def release(self, request_id: str) -> None:
        """A request admitted under a budget ended before its run reported an outcome (one that never started
        reports none): its reservation no longer counts (its outcome, if one comes, still settles it)."""
        self.spend.release(request_id)

    def record(self, outcome: RequestOutcome) -> None:
        """An engine recorder, right after the usage writer's: a keyed request's cost settles its reservation,
        and the tokens it used are added to its key's tokens per minute."""
        if outcome.key is None:
            return
        self.spend.settle(outcome.request_id, outcome.breakdown.cost)
        tpm = self._tpm.get(outcome.key.id)
        usage = outcome.breakdown.usage()
        tokens = usage.prompt_tokens + usage.completion_tokens
        if tpm and tokens > 0:
            counting = self.limits.count_tokens(f"key:{outcome.key.id}", tpm, tokens)
            task = asyncio.get_running_loop().create_task(counting)
            self._counting.add(task)
            task.add_done_callback(self._counting.discard)

    async def close(self, timeout_s: float = 2.0) -> None:
        """At shutdown: the token counts still being added."""
        if self._counting:
            await asyncio.wait(set(self._counting), timeout=timeout_s)


def _over_budget(
    key: ApiKey, budget: Decimal, spent: Decimal, worst: Decimal, end_ms: int, now: float
) -> BudgetExceeded:
    retry_after = max(1, int(end_ms / 1000 - now) + 1)
    so_far = "today" if key.period == "day" else "this month"
    return BudgetExceeded(
        f"This API key's budget of {usd(budget)} per {key.period} would be exceeded: {usd(spent)} spent {so_far} "
        f"(UTC), and this request could cost up to {usd(worst)}. The budget renews at {iso_ms(end_ms)}.",
        headers={"Retry-After": str(retry_after)},
    )
