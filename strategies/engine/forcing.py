"""Teacher forcing: a request may fix the tokens it generates, to score a given continuation under
its attention strategy (`attnserve eval`'s decode perplexity, docs/evaluation.md).

A request carries the token ids in ``SamplingParams.extra_args["attnserve_force_tokens"]`` (the
HTTP API takes them as ``vllm_xargs.attnserve_force_tokens`` and validates them first:
server/routes.py). ``ForcedTokensLogitsProcessor`` (a vLLM v1 logits processor, loaded in the
workers through the engine argument ``logits_processors``: server/config.py) makes output step ``i``
sample token ``i``: every other logit of the row becomes -inf and the forced token's 0, whatever
sampling or earlier processors did, so greedy and random sampling both pick it. Steps past the end
of the list sample as usual. The step is ``len(output_token_ids)`` of the request, the list vLLM
keeps up to date (the built-in min-tokens processor counts the same way), so preemption,
chunked prefill (a partial chunk's sample is discarded) and moves inside the persistent batch need
nothing more.

Why the logprobs stay the strategy's own: vLLM v1's sampler computes the logprobs it returns from
the raw logits *before* any logits processor (``logprobs_mode="raw_logprobs"``, the default;
vllm/v1/sample/sampler.py), then gathers them at the sampled token. With forcing, the logprob
returned for output token ``i`` is therefore log p_model(token_i | prompt, tokens_<i) under the
request's attention: a teacher-forced log-likelihood. (A server started with another
``logprobs_mode`` would return processed values; attnserve does not set it.)

The first output token is sampled from the prefill's forward pass, the later ones from decode
steps: for a strategy with dense prefill (recycled, landmark) the first token's logprob is that of
full attention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)

# The key in `SamplingParams.extra_args` (and in a request's `vllm_xargs`).
FORCE_TOKENS_KEY = "attnserve_force_tokens"
# The engine argument value that loads the processor (`--logits-processors`).
PROCESSOR_FQCN = "strategies.engine.forcing:ForcedTokensLogitsProcessor"


def parse_force_tokens(value: Any, vocab_size: int | None = None) -> list[int]:
    """The forced token ids of a request, or ValueError saying what is allowed: a non-empty list of
    integer token ids, each in [0, vocab_size)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of token ids (integers), got "
                         f"{type(value).__name__ if not isinstance(value, (list, tuple)) else 'an empty list'}")
    tokens: list[int] = []
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"item {i} is {token!r}; expected token ids (integers)")
        upper = f", < {vocab_size} (the model's vocabulary)" if vocab_size is not None else ""
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ValueError(f"item {i} is {token}; token ids must be >= 0{upper}")
        tokens.append(token)
    return tokens


class ForcedTokensLogitsProcessor(LogitsProcessor):
    """Output step i of a request with `extra_args["attnserve_force_tokens"]` samples its token i
    (module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # In the API process, before the engine: the HTTP routes validate first (with the
        # vocabulary bound); this covers other callers of the engine.
        extra = sampling_params.extra_args or {}
        if FORCE_TOKENS_KEY in extra:
            try:
                parse_force_tokens(extra[FORCE_TOKENS_KEY])
            except ValueError as err:
                raise VLLMValidationError(f"{FORCE_TOKENS_KEY}: {err}",
                                          parameter=FORCE_TOKENS_KEY) from None

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool):
        self.device = device
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        # batch row -> (forced token ids, the request's live output token ids)
        self.rows: dict[int, tuple[list[int], Sequence[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def _new_state(self, params: SamplingParams, _prompt: list[int] | None,
                   output_ids: list[int]) -> tuple[list[int], Sequence[int]] | None:
        extra = params.extra_args or {}
        if FORCE_TOKENS_KEY not in extra:
            return None
        try:
            tokens = parse_force_tokens(extra[FORCE_TOKENS_KEY], self.vocab_size)
        except ValueError as err:  # unreachable through the API (validated there)
            logger.warning("attnserve: ignoring %s: %s", FORCE_TOKENS_KEY, err)
            return None
        return tokens, output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows: list[int] = []
        tokens: list[int] = []
        for row, (forced, output_ids) in self.rows.items():
            step = len(output_ids)
            if step < len(forced) and row < logits.shape[0]:
                rows.append(row)
                tokens.append(forced[step])
        if rows:
            row_index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            token_index = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            logits[row_index] = float("-inf")
            logits[row_index, token_index] = 0.0
        return logits
