"""`vllm_xargs.attnserve_force_tokens`: the token ids a request's output must be (teacher forcing,
strategies/forcing.py), validated here before anything reaches the engine (docs/evaluation.md,
"Teacher-forced decode perplexity")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strategies.forcing import FORCE_TOKENS_KEY, parse_force_tokens

FORCE_TOKENS_PARAM = f"vllm_xargs.{FORCE_TOKENS_KEY}"


class ForceTokensError(ValueError):
    """Becomes a 400 naming `param`."""

    def __init__(self, message: str, param: str = FORCE_TOKENS_PARAM):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ForcingPolicy:
    enabled: bool  # the engine runs the forcing logits processor
    vocab_size: int | None = None

    def parse(self, value: Any) -> list[int]:
        if not self.enabled:
            raise ForceTokensError(
                "teacher forcing is not available on this server (its engine runs without "
                "attnserve's logits processor, e.g. with speculative decoding)")
        try:
            return parse_force_tokens(value, self.vocab_size)
        except ValueError as err:
            raise ForceTokensError(str(err)) from None


def pop_force_tokens(body: dict[str, Any]) -> tuple[bool, Any]:
    """Remove `vllm_xargs.attnserve_force_tokens` from the body: (given, value)."""
    xargs = body.get("vllm_xargs")
    if not isinstance(xargs, dict) or FORCE_TOKENS_KEY not in xargs:
        return False, None
    value = xargs.pop(FORCE_TOKENS_KEY)
    if not xargs:
        body["vllm_xargs"] = None
    return True, value


def check_compatible(request: Any) -> None:
    """Forcing overrides the sampled token; what constrains it another way cannot go with it."""
    if getattr(request, "use_beam_search", False):
        raise ForceTokensError("cannot be combined with use_beam_search")
    structured = getattr(request, "structured_outputs", None)
    response_format = getattr(request, "response_format", None)
    if structured is not None or (response_format is not None
                                  and getattr(response_format, "type", "text") != "text"):
        raise ForceTokensError("cannot be combined with structured outputs (response_format / "
                               "structured_outputs): the grammar would reject forced tokens")
