"""The bound on the strategies' own buffers: memory outside vLLM's KV cache that grows with requests (today
`recycled`'s pool of recycled KV; `Strategy.request_state_bytes`). Each engine request reserves its bytes
here, computed from its prompt's length and `max_tokens`, before it reaches the engine, and gives them
back when it ends (finished, aborted, timed out). Past the bound a request waits for bytes to come back,
up to `--strategy-memory-wait` seconds, then gets a 429; one that alone needs more than the bound gets a
400 naming its budget field. The workers never grow a pool past the bound (`STATE_BYTES_LIMIT_ENV`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from vllm.exceptions import GracefulHTTPError, VLLMValidationError

from server import metrics

MiB = 1 << 20


def mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f} MiB"


@dataclass
class StateLedger:
    """Bytes reserved by the requests in flight, by strategy, against ``limit`` (None: unbounded)."""

    limit: int | None = None
    wait_s: float = 0.0
    reserved: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._freed: asyncio.Condition | None = None

    @property
    def total(self) -> int:
        return sum(self.reserved.values())

    def fits(self, nbytes: int) -> bool:
        return self.limit is None or self.total + nbytes <= self.limit

    @contextlib.asynccontextmanager
    async def hold(self, strategy: str, nbytes: int, budget_field: str) -> AsyncIterator[None]:
        """Reserve ``nbytes`` for ``strategy`` while the block runs (nothing for 0 bytes)."""
        if nbytes <= 0:
            yield
            return
        if self.limit is not None and nbytes > self.limit:
            raise VLLMValidationError(
                f"{budget_field}: this request needs {mib(nbytes)} of {strategy}'s buffers at its longest "
                f"context (prompt + max_tokens), more than this server's bound of {mib(self.limit)} "
                f"(--strategy-memory-gib); allowed: a smaller {budget_field} or max_tokens",
                parameter=budget_field, value=nbytes)
        await self._acquire(strategy, nbytes)
        try:
            yield
        finally:
            self._release(strategy, nbytes)

    async def _acquire(self, strategy: str, nbytes: int) -> None:
        if not self.fits(nbytes):
            if self._freed is None:
                self._freed = asyncio.Condition()
            async with self._freed:
                try:
                    await asyncio.wait_for(self._freed.wait_for(lambda: self.fits(nbytes)), self.wait_s)
                except TimeoutError:
                    metrics.reject(metrics.REJECT_MEMORY)
                    raise GracefulHTTPError(
                        f"the strategies' buffers are at this server's bound of {mib(self.limit or 0)} "
                        f"(--strategy-memory-gib; {mib(self.total)} reserved, this request needs "
                        f"{mib(nbytes)} for {strategy}) and none came back within "
                        f"{self.wait_s:g} s (--strategy-memory-wait); retry later",
                        HTTPStatus.TOO_MANY_REQUESTS) from None
        self.reserved[strategy] = self.reserved.get(strategy, 0) + nbytes
        metrics.set_state_bytes_reserved(strategy, self.reserved[strategy])

    def _release(self, strategy: str, nbytes: int) -> None:
        self.reserved[strategy] -= nbytes
        metrics.set_state_bytes_reserved(strategy, self.reserved[strategy])
        if self._freed is not None:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        assert self._freed is not None
        async with self._freed:
            self._freed.notify_all()


def request_state_bytes(extra_args: dict | None, prompt_len: int, max_tokens: int | None, count: int,
                        model: Any) -> tuple[str, int, str]:
    """(strategy, bytes, the request's budget field) of an engine request: its strategy's buffers at the
    longest context it can reach (prompt + max_tokens, at most the model's length), ``count`` sequences."""
    from strategies.registry import AttentionChoice, get

    choice = AttentionChoice.from_extra_args(extra_args)
    strategy = get(choice.strategy)
    budget_field = "attention.budget" if choice.budget is not None else \
        f"attention.params.{strategy.budget_param}" if strategy.budget_param else "attention.params"
    if model is None:
        return choice.strategy, 0, budget_field
    longest = min(prompt_len + (max_tokens or 0), model.max_model_len)
    params = choice.for_context(prompt_len, model).params
    return choice.strategy, count * strategy.request_state_bytes(params, longest, model), budget_field
