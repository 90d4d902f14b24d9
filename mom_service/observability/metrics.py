"""Prometheus metrics: one registry per app, filled by an engine recorder, served at `GET /metrics`.

Every label value is a name from the config (MoM models, LLMs), one of a fixed set of words, or the name of an API
key (the first MOM_METRICS_MAX_KEYS keys seen; the others are counted as `other`): nothing a client sends becomes a
label, so the number of series stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mom_service.config import MoMConfig
from mom_service.engine.events import CallReport, MemberStatus, RequestOutcome, RequestStatus, Surface
from mom_service.engine.inflight import InFlight
from mom_service.providers.circuit_breaker import CIRCUIT_STATES, CircuitBreakers
from mom_service.usage.writer import UsageWriter

OTHER = "other"  # the label of a name that is not in the config (never expected: plans only name configured ones)

# LLM calls take seconds, not milliseconds: buckets from 50 ms to 5 min.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
TOKEN_KINDS = ("prompt", "completion", "reasoning", "cached")
CACHE_RESULTS = ("hit", "miss")
RELOAD_RESULTS = ("reloaded", "unchanged", "refused")


class _UsageWriterCollector:
    """The usage writer's queue, read when Prometheus scrapes (nothing to keep in step)."""

    def __init__(self, writer: UsageWriter) -> None:
        self._writer = writer

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "mom_usage_queue_depth",
            "Usage records waiting to be written to the database.",
            value=self._writer.depth,
        )
        yield CounterMetricFamily(
            "mom_usage_records_dropped",
            "Usage records dropped because the queue was full.",
            value=self._writer.dropped,
        )


class _CircuitCollector:
    """Each LLM's circuit breaker, read when Prometheus scrapes."""

    def __init__(self, breakers: CircuitBreakers) -> None:
        self.breakers = breakers  # a reloaded config's engine brings its own

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(
            "mom_circuit_state",
            "Circuit breaker state per LLM: 1 for the state it is in (closed, open, half_open), else 0.",
            labels=["llm", "state"],
        )
        opened = CounterMetricFamily(
            "mom_circuit_opened", "Times an LLM's circuit breaker opened (or re-opened after a probe).", labels=["llm"]
        )
        breakers = self.breakers
        for name in breakers.names():
            view = breakers.view(name)
            for candidate in CIRCUIT_STATES:
                state.add_metric([name, candidate], 1.0 if view.state == candidate else 0.0)
            opened.add_metric([name], view.opened)
        yield state
        yield opened


class Metrics:
    """The app's Prometheus metrics. `record` is an engine recorder: it sees every finished request once."""

    def __init__(
        self,
        config: MoMConfig,
        writer: UsageWriter | None = None,
        breakers: CircuitBreakers | None = None,
        *,
        max_keys: int = 50,
    ) -> None:
        self.registry = CollectorRegistry()
        self._models = frozenset(m.name for m in config.models)
        self._llms = frozenset(d.name for d in config.llm_definitions)
        self._max_keys = max_keys
        self._keys: set[str] = set()  # the key names with series of their own
        r = self.registry
        self.requests = Counter(
            "mom_requests",
            "Requests answered by the engine, by surface and how they ended.",
            ["model", "surface", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mom_request_duration_seconds",
            "Time from the start of the panel to the end of the request.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mom_time_to_first_token_seconds",
            "Time from the start of the panel to the synthesis' first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.upstream_calls = Counter(
            "mom_upstream_calls",
            "Upstream LLM calls (panel members, rankers and concluding calls), by stage and status.",
            ["llm", "role", "stage", "status"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "mom_upstream_call_duration_seconds",
            "Duration of upstream LLM calls that were made.",
            ["llm", "role"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "mom_tokens",
            "Tokens used by upstream calls; completion includes reasoning, prompt includes cached.",
            ["llm", "kind"],
            registry=r,
        )
        self.cost = Counter("mom_cost_usd", "USD of upstream calls whose price is known.", ["llm"], registry=r)
        self.unpriced = Counter(
            "mom_unpriced_calls", "Upstream calls with no known price (left out of the cost).", ["llm"], registry=r
        )
        self.cache = Counter("mom_cache", "Response cache lookups by result.", ["result"], registry=r)
        self.saved = Counter(
            "mom_cost_saved_usd",
            "USD not spent thanks to the response cache (answers and members' answers).",
            ["model"],
            registry=r,
        )
        self.key_requests = Counter(
            "mom_key_requests",
            "Requests made with an API key, by key name (beyond MOM_METRICS_MAX_KEYS names: other) and outcome.",
            ["key", "outcome"],
            registry=r,
        )
        self.key_cost = Counter(
            "mom_key_cost_usd",
            "USD of the upstream calls of requests made with an API key, by key name (beyond the limit: other).",
            ["key"],
            registry=r,
        )
        self.in_flight = Gauge("mom_requests_in_flight", "Chat requests being answered.", registry=r)
        self.answering = Gauge(
            "mom_answers_in_progress",
            "Answers the engine is producing, replaying or following for a request now (past validation, their "
            "outcome not recorded yet).",
            registry=r,
        )
        self.reloads = Counter(
            "mom_config_reloads",
            "Config reloads (SIGHUP, POST /admin/reload, the file watch) by result: reloaded, unchanged, refused.",
            ["result"],
            registry=r,
        )
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        if writer is not None:
            r.register(_UsageWriterCollector(writer))
        self._circuits: _CircuitCollector | None = None
        if breakers is not None:
            self._circuits = _CircuitCollector(breakers)
            r.register(self._circuits)
        self._zero_series(config)

    def reconfigure(self, config: MoMConfig, breakers: CircuitBreakers) -> None:
        """A reloaded config: its names become labels (the old ones stay, for the requests still running on them),
        its series start at 0, its engine's circuit breakers are the ones reported."""
        self._models |= {m.name for m in config.models}
        self._llms |= {d.name for d in config.llm_definitions}
        if self._circuits is not None:
            self._circuits.breakers = breakers
        self._zero_series(config)

    def _zero_series(self, config: MoMConfig) -> None:
        """Create every configured series at 0, so rates and increases work from the first request."""
        for model in config.models:
            for surface in get_args(Surface):
                for outcome in get_args(RequestStatus):
                    self.requests.labels(model.name, surface, outcome)
            self.request_duration.labels(model.name)
            self.ttft.labels(model.name)
            self.saved.labels(model.name)
            roles = [(name, "member", "answer") for name in model.llms_to_query]
            roles.append((model.concluding_llm, "concluding", "conclude"))
            for llm, role, stage in roles:
                self.upstream_duration.labels(llm, role)
                for status in get_args(MemberStatus):
                    self.upstream_calls.labels(llm, role, stage, status)
        for llm in self._llms:
            for kind in TOKEN_KINDS:
                self.tokens.labels(llm, kind)
            self.cost.labels(llm)
            self.unpriced.labels(llm)
        for result in CACHE_RESULTS:
            self.cache.labels(result)

    def _model(self, name: str) -> str:
        return name if name in self._models else OTHER

    def _llm(self, name: str) -> str:
        return name if name in self._llms else OTHER

    def _key(self, name: str) -> str:
        """A key's label: its name while at most MOM_METRICS_MAX_KEYS names have series, else `other`."""
        if name not in self._keys:
            if len(self._keys) >= self._max_keys:
                return OTHER
            self._keys.add(name)
        return name

    def record(self, outcome: RequestOutcome) -> None:
        """The engine recorder: count the request and each of its upstream calls."""
        model = self._model(outcome.mom_model)
        breakdown = outcome.breakdown
        self.requests.labels(model, outcome.surface, outcome.status).inc()
        if outcome.key is not None:
            key = self._key(outcome.key.name)
            self.key_requests.labels(key, outcome.status).inc()
            cost = breakdown.cost
            self.key_cost.labels(key).inc(float(cost) if cost else 0.0)
        self.request_duration.labels(model).observe(outcome.latency_ms / 1000)
        if outcome.ttft_ms is not None:
            self.ttft.labels(model).observe(outcome.ttft_ms / 1000)
        self.cache.labels(breakdown.cache if breakdown.cache in CACHE_RESULTS else OTHER).inc()
        saved = breakdown.saved
        if saved:
            self.saved.labels(model).inc(float(saved))
        if breakdown.cache == "hit":
            return  # answered from the cache: no upstream call was made
        for report in breakdown.calls:
            if not report.cached:
                self._record_call(report)

    def _record_call(self, report: CallReport) -> None:
        if report.error_type == "relay":
            return  # a member a tool loop's relayed turn does not ask by design: not a call, nor a skipped one
        llm = self._llm(report.name)
        self.upstream_calls.labels(llm, report.role, report.stage, report.status).inc()
        if report.status == "skipped":
            return
        if report.latency_ms is not None:
            self.upstream_duration.labels(llm, report.role).observe(report.latency_ms / 1000)
        usage = report.usage
        if usage is not None:
            counts = (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens, usage.cached_tokens)
            for kind, count in zip(TOKEN_KINDS, counts, strict=True):
                if count > 0:
                    self.tokens.labels(llm, kind).inc(count)
        if report.cost is None:
            self.unpriced.labels(llm).inc()
        elif report.cost > 0:
            self.cost.labels(llm).inc(float(report.cost))

    def watch(self, active: InFlight) -> None:
        """Read the engine's count of answers in progress at each scrape."""
        self.answering.set_function(lambda: active.count)

    @contextmanager
    def counting_in_flight(self) -> Iterator[None]:
        """Count a chat request as in flight while the block runs."""
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    content_type = CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
