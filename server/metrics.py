"""attnserve's own Prometheus metrics, in the registry that `/metrics` already serves with vLLM's
engine metrics (`vllm:*`). Every name starts with `attnserve:`; the per-request ones are labelled
by attention `strategy`.

| metric | type | labels | what |
|---|---|---|---|
| `attnserve:requests_total` | counter | strategy, status | generation requests that passed validation, when they end; status `ok`, `bad_input` (a 4xx from vLLM, e.g. prompt too long), `overload` (429: no room for the strategy's buffers within `--strategy-memory-wait`), `timeout` (`--request-timeout`), `aborted` (the client went away), `error` (5xx / engine error) |
| `attnserve:request_errors_total` | counter | strategy, reason | the accepted requests that did not end `ok`, by reason (the status above, `error` split into `engine_dead` and `engine_error`) |
| `attnserve:requests_rejected_total` | counter | reason | requests refused: `auth` (401), `overload` (429, `--max-concurrent-requests`), `memory` (429, `--strategy-memory-gib`), `timeout` (504), `bad_input` (400/413/422), `draining` (503 while shutting down) |
| `attnserve:time_to_first_token_seconds` | histogram | strategy | from the engine submission to the first output token |
| `attnserve:time_per_output_token_seconds` | histogram | strategy | (last token - first token) / (output tokens - 1), per request |
| `attnserve:e2e_request_latency_seconds` | histogram | strategy | from the engine submission to the last output |
| `attnserve:attended_fraction` | histogram | strategy | attended / total KV tokens of each request (the `attention.attended_fraction` it reports) |
| `attnserve:requests_in_flight` | gauge | | generation requests running or queued (what `--max-concurrent-requests` bounds) |
| `attnserve:max_concurrent_requests` | gauge | | the configured bound (0: none) |
| `attnserve:kv_cache_blocks_used` / `attnserve:kv_cache_blocks_total` | gauge | | KV blocks held, from vLLM's accounting (`vllm:kv_cache_usage_perc` x the engine's block count) |
| `attnserve:strategy_memory_reserved_bytes` | gauge | strategy | the strategies' own buffers (outside the KV cache) reserved by the requests in flight (server/resources.py) |
| `attnserve:strategy_memory_held_bytes` | gauge | strategy | the bytes those buffers hold now in the workers (summed over workers; read at scrape time) |
| `attnserve:strategy_memory_limit_bytes` | gauge | | the bound on the reserved bytes (`--strategy-memory-gib`; 0: none) |
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from vllm.v1.metrics.prometheus import get_prometheus_registry

# Request outcomes (`status` of attnserve:requests_total).
OK = "ok"
BAD_INPUT = "bad_input"
OVERLOAD = "overload"
TIMEOUT = "timeout"
ABORTED = "aborted"
ERROR = "error"

# Rejection reasons (attnserve:requests_rejected_total).
REJECT_AUTH = "auth"
REJECT_OVERLOAD = "overload"
REJECT_TIMEOUT = "timeout"
REJECT_BAD_INPUT = "bad_input"
REJECT_DRAINING = "draining"
REJECT_MEMORY = "memory"
REJECT_REASONS = (REJECT_AUTH, REJECT_OVERLOAD, REJECT_TIMEOUT, REJECT_BAD_INPUT, REJECT_DRAINING, REJECT_MEMORY)

# Error reasons (attnserve:request_errors_total): the non-ok statuses, `error` split in two.
ENGINE_DEAD = "engine_dead"
ENGINE_ERROR = "engine_error"
ERROR_REASONS = (BAD_INPUT, OVERLOAD, TIMEOUT, ABORTED, ENGINE_DEAD, ENGINE_ERROR)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 320.0, 640.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)
FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                    0.95, 0.99, 1.0)


class _Metrics:
    def __init__(self) -> None:
        registry = get_prometheus_registry()
        self.requests = Counter(
            "attnserve:requests",
            "Generation requests that passed validation, counted when they end, by attention "
            "strategy and outcome.",
            labelnames=["strategy", "status"], registry=registry)
        self.errors = Counter(
            "attnserve:request_errors",
            "Accepted generation requests that did not end ok, by strategy and reason.",
            labelnames=["strategy", "reason"], registry=registry)
        self.rejected = Counter(
            "attnserve:requests_rejected",
            "Requests refused by the server, by reason (auth, overload, memory, timeout, bad_input, "
            "draining).",
            labelnames=["reason"], registry=registry)
        self.ttft = Histogram(
            "attnserve:time_to_first_token_seconds",
            "Time from the engine submission to the first output token, by strategy.",
            labelnames=["strategy"], buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram(
            "attnserve:time_per_output_token_seconds",
            "Mean time per output token after the first, per request, by strategy.",
            labelnames=["strategy"], buckets=TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram(
            "attnserve:e2e_request_latency_seconds",
            "Time from the engine submission to the last output, by strategy.",
            labelnames=["strategy"], buckets=E2E_BUCKETS, registry=registry)
        self.attended_fraction = Histogram(
            "attnserve:attended_fraction",
            "Attended / total KV tokens of each request, by strategy.",
            labelnames=["strategy"], buckets=FRACTION_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "attnserve:requests_in_flight",
            "Generation requests running or queued (bounded by --max-concurrent-requests).",
            registry=registry)
        self.max_concurrent = Gauge(
            "attnserve:max_concurrent_requests",
            "The configured bound on running + queued generation requests (0: none).",
            registry=registry)
        self.kv_collector = _KVBlocksCollector()
        registry.register(self.kv_collector)
        self.state_reserved = Gauge(
            "attnserve:strategy_memory_reserved_bytes",
            "Bytes of the strategies' own buffers (outside the KV cache) reserved by requests in flight.",
            labelnames=["strategy"], registry=registry)
        self.state_limit = Gauge(
            "attnserve:strategy_memory_limit_bytes",
            "The bound on the strategies' reserved buffer bytes (--strategy-memory-gib; 0: none).",
            registry=registry)
        registry.register(_HeldBytesCollector())
        self._export_zero_series()

    def _export_zero_series(self) -> None:
        """Counters appear at 0 for every known label from the start, so dashboards and alerts see
        a series (a labelled counter is otherwise absent until its first increment)."""
        from strategies.registry import names

        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for strategy in names():
            for reason in ERROR_REASONS:
                self.errors.labels(strategy=strategy, reason=reason)
            for status in (OK, BAD_INPUT, OVERLOAD, TIMEOUT, ABORTED, ERROR):
                self.requests.labels(strategy=strategy, status=status)
            self.state_reserved.labels(strategy=strategy).set(0)


class _KVBlocksCollector(Collector):
    """KV blocks held, from vLLM's own gauge (`vllm:kv_cache_usage_perc`, a fraction of the
    engine's blocks) and the engine's block count; read at scrape time."""

    def __init__(self) -> None:
        self.num_blocks: int | None = None

    def collect(self):
        if not self.num_blocks:
            return
        usage = _vllm_kv_usage()
        used = GaugeMetricFamily("attnserve:kv_cache_blocks_used",
                                 "KV cache blocks held by requests (vLLM's accounting).")
        total = GaugeMetricFamily("attnserve:kv_cache_blocks_total",
                                  "KV cache blocks of the engine.")
        total.add_metric([], float(self.num_blocks))
        if usage is not None:
            used.add_metric([], round(usage * self.num_blocks))
            yield used
        yield total


class _HeldBytesCollector(Collector):
    """The strategies' buffer bytes held in the workers, from their live-state files
    (strategies.engine.stats), summed over workers; read at scrape time."""

    def collect(self):
        from strategies.engine import stats

        held: dict[str, int] = {}
        for record in stats.read_live_state():
            for strategy, nbytes in (record.get("held_bytes") or {}).items():
                held[strategy] = held.get(strategy, 0) + int(nbytes)
        family = GaugeMetricFamily("attnserve:strategy_memory_held_bytes",
                                   "Bytes the strategies' own buffers hold in the workers now.",
                                   labels=["strategy"])
        for strategy, nbytes in sorted(held.items()):
            family.add_metric([strategy], float(nbytes))
        yield family


def _vllm_kv_usage() -> float | None:
    registry = get_prometheus_registry()
    collector = registry._names_to_collectors.get("vllm:kv_cache_usage_perc")  # noqa: SLF001
    if collector is None:
        return None
    values = [s.value for m in collector.collect() for s in m.samples
              if s.name == "vllm:kv_cache_usage_perc"]
    return sum(values) if values else None


_metrics: _Metrics | None = None


def init_metrics(max_concurrent_requests: int | None = None, kv_blocks: int | None = None,
                 state_bytes_limit: int | None = None) -> None:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    _metrics.max_concurrent.set(max_concurrent_requests or 0)
    _metrics.state_limit.set(state_bytes_limit or 0)
    if kv_blocks:
        _metrics.kv_collector.num_blocks = int(kv_blocks)


def finish_request(strategy: str, status: str, reason: str | None = None) -> None:
    """A validated generation request ended with `status`."""
    if _metrics is None:
        return
    _metrics.requests.labels(strategy=strategy, status=status).inc()
    if status != OK:
        _metrics.errors.labels(strategy=strategy, reason=reason or status).inc()
    if status == TIMEOUT:
        _metrics.rejected.labels(reason=REJECT_TIMEOUT).inc()
    elif status == BAD_INPUT:
        _metrics.rejected.labels(reason=REJECT_BAD_INPUT).inc()


def reject(reason: str) -> None:
    if _metrics is not None:
        _metrics.rejected.labels(reason=reason).inc()


def observe_latency(strategy: str, ttft: float | None, tpot: float | None, e2e: float) -> None:
    if _metrics is None:
        return
    if ttft is not None:
        _metrics.ttft.labels(strategy=strategy).observe(ttft)
    if tpot is not None:
        _metrics.tpot.labels(strategy=strategy).observe(tpot)
    _metrics.e2e.labels(strategy=strategy).observe(e2e)


def observe_attended_fraction(strategy: str, fraction: float | None) -> None:
    if _metrics is not None and fraction is not None:
        _metrics.attended_fraction.labels(strategy=strategy).observe(fraction)


def set_state_bytes_reserved(strategy: str, nbytes: int) -> None:
    if _metrics is not None:
        _metrics.state_reserved.labels(strategy=strategy).set(nbytes)


def set_in_flight(count: int) -> None:
    if _metrics is not None:
        _metrics.in_flight.set(count)
