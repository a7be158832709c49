"""attnserve's own Prometheus metrics, in the registry that `/metrics` already serves with vLLM's
engine metrics (`vllm:*`)."""

from __future__ import annotations

from prometheus_client import Counter
from vllm.v1.metrics.prometheus import get_prometheus_registry

_requests_by_strategy: Counter | None = None


def init_metrics() -> None:
    global _requests_by_strategy
    if _requests_by_strategy is None:
        _requests_by_strategy = Counter(
            "attnserve:requests",
            "Generation requests accepted, by attention strategy.",
            labelnames=["strategy"],
            registry=get_prometheus_registry(),
        )


def count_request(strategy: str) -> None:
    if _requests_by_strategy is not None:
        _requests_by_strategy.labels(strategy=strategy).inc()
