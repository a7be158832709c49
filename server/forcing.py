"""`vllm_xargs.attnserve_force_tokens`: the token ids a request's output must be (teacher forcing,
strategies/engine/forcing.py), validated here before anything reaches the engine (docs/evaluation.md,
"Teacher-forced decode perplexity")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strategies.base import ParamError
from strategies.engine.forcing import FORCE_TOKENS_KEY, parse_force_tokens

FORCE_TOKENS_PARAM = f"vllm_xargs.{FORCE_TOKENS_KEY}"


@dataclass(frozen=True)
class ForcingPolicy:
    enabled: bool  # the engine runs the forcing logits processor
    vocab_size: int | None = None

    def parse(self, value: Any) -> list[int]:
        if not self.enabled:
            raise ParamError(
                FORCE_TOKENS_PARAM,
                "teacher forcing is not available on this server (its engine runs without "
                "attnserve's logits processor, e.g. with speculative decoding)")
        try:
            return parse_force_tokens(value, self.vocab_size)
        except ValueError as err:
            raise ParamError(FORCE_TOKENS_PARAM, str(err)) from None


def check_compatible(request: Any) -> None:
    """Forcing overrides the sampled token; what constrains it another way cannot go with it."""
    if getattr(request, "use_beam_search", False):
        raise ParamError(FORCE_TOKENS_PARAM, "cannot be combined with use_beam_search")
    structured = getattr(request, "structured_outputs", None)
    response_format = getattr(request, "response_format", None)
    if structured is not None or (response_format is not None
                                  and getattr(response_format, "type", "text") != "text"):
        raise ParamError(FORCE_TOKENS_PARAM, "cannot be combined with structured outputs (response_format / "
                               "structured_outputs): the grammar would reject forced tokens")
