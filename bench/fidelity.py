"""Fidelity of a strategy to `full` attention on long natural text, independent of model strength.

For a prompt of L tokens of natural text available offline (the licence texts shipped with the OS,
concatenated), both `full` and the strategy continue it greedily for 64 tokens (ignore_eos) with
the top-k logprobs of every step (k = 20, vLLM's default `max_logprobs`):

- `agreement`: the fraction of the 64 positions where the strategy's greedy token equals full's
  (position-wise; after a first divergence the two continuations condition on different text, so
  this counts later re-synchronisation too).
- `prefix`: the length of the common prefix of the two continuations, over 64.
- `kl`: the mean KL(full || strategy) of the next-token distributions over the positions up to and
  including the first divergence (where both condition on the same tokens, so this equals a
  teacher-forced measurement). Only the top-k of each distribution is known: the KL is computed
  on full's top-k tokens plus one "other" bucket. When all of full's top-k tokens are in the
  strategy's top-k, this coarsened KL is exact and a lower bound of the true KL (data-processing
  inequality); a token missing from the strategy's top-k gets min(the strategy's k-th probability,
  its remaining mass / (missing + 1)), which makes it an estimate.
- `decode_ppl_ratio`: perplexity of the text's true continuation (the next 64 tokens of the
  corpus after the prompt) under the strategy over that under full, teacher-forced: the request
  forces its output to be those tokens (`vllm_xargs.attnserve_force_tokens`, strategies/engine/forcing.py)
  and returns the model's raw logprob of each, so every scored token comes from a *decode* step
  under the strategy's attention. The first output token is sampled from the prefill's forward
  pass (dense for recycled and landmark), so it is left out: the perplexity is over tokens 2..64
  (63 decode steps), for every strategy alike. This is the perplexity ratio that measures
  decode-time attention, for all strategies.
- `prompt_ppl_ratio`: perplexity of the prompt's second half under the strategy over that under
  full, from vLLM's `prompt_logprobs` (teacher-forced over the prompt). Prompt logprobs come from
  the prefill, so this measures the strategy's *prefill* attention: it is measured only for
  strategies whose prefill is sparse (`dense_prefill: false` in GET /v1/strategies: sink, seer).
  For dense-prefill strategies (recycled, landmark) it is 1 by construction and reported as null.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from functools import lru_cache

from bench.tasks import natural_documents

CONTINUATION_TOKENS = 64
# Output tokens left out of the decode perplexity: the first comes from the prefill forward pass.
DECODE_PPL_SKIP = 1
TOP_LOGPROBS = 20
PROB_FLOOR = 1e-10


@dataclass(frozen=True)
class TextSample:
    length: int
    index: int
    seed: int
    source: str
    offset: int  # token offset in the concatenated corpus
    prompt_ids: list[int]
    continuation_ids: list[int] = dataclasses.field(default_factory=list)  # the text's next tokens

    @property
    def sample_id(self) -> str:
        return f"text-L{self.length}-{self.index}"


@lru_cache(maxsize=4)
def corpus_tokens(tokenizer) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """(name, start offset, token ids) of each offline natural text, in order."""
    out = []
    offset = 0
    for name, text in natural_documents():
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        out.append((name, offset, ids))
        offset += len(ids)
    if not out:
        raise RuntimeError("no natural text found offline (expected licence texts in /usr/share/common-licenses)")
    return tuple(out)


def text_sample(length: int, tokenizer, seed: int = 0, index: int = 0,
                continuation: int = CONTINUATION_TOKENS) -> TextSample:
    """L tokens of natural text from a seeded offset in the concatenated corpus (wrapping), and
    the `continuation` tokens that follow them there."""
    docs = corpus_tokens(tokenizer)
    stream: list[int] = [t for _, _, ids in docs for t in ids]
    if length + continuation > len(stream):
        raise ValueError(f"length {length} + {continuation} exceeds the offline corpus "
                         f"({len(stream)} tokens)")
    rng = random.Random(f"{seed}:text:{length}:{index}")
    offset = rng.randrange(len(stream))
    window = (stream + stream[:length + continuation])[offset:offset + length + continuation]
    source = next(name for name, start, doc in reversed(docs) if start <= offset)
    return TextSample(length, index, seed, source, offset, window[:length], window[length:])


def agreement(reference: list[int], candidate: list[int]) -> float:
    n = len(reference)
    if n == 0:
        return float("nan")
    return sum(1 for a, b in zip(reference, candidate) if a == b) / n


def common_prefix(reference: list[int], candidate: list[int]) -> int:
    n = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        n += 1
    return n


def topk_kl(p_top: dict[int, float], q_top: dict[int, float]) -> float:
    """KL(p || q) from the top-k logprobs of each (see the module docstring)."""
    if not p_top or not q_top:
        return float("nan")
    p = {t: math.exp(v) for t, v in p_top.items()}
    q_known = {t: math.exp(v) for t, v in q_top.items()}
    q_min = min(q_known.values())
    q_rest = max(1.0 - sum(q_known.values()), 0.0)
    missing = [t for t in p if t not in q_known]
    q_guess = min(q_min, q_rest / (len(missing) + 1)) if missing else 0.0
    kl = 0.0
    q_sum = 0.0
    for t, pt in p.items():
        qt = max(q_known.get(t, q_guess), PROB_FLOOR)
        q_sum += qt
        kl += pt * math.log(max(pt, PROB_FLOOR) / qt)
    p_other = max(1.0 - sum(p.values()), 0.0)
    q_other = max(1.0 - q_sum, PROB_FLOOR)
    if p_other > PROB_FLOOR:
        kl += p_other * math.log(p_other / q_other)
    return max(kl, 0.0)


def decode_fidelity(ref_ids: list[int], ref_top: list[dict[int, float]],
                    ids: list[int], top: list[dict[int, float]]) -> dict:
    """agreement, prefix, kl of one continuation against full's."""
    n = len(ref_ids)
    prefix = common_prefix(ref_ids, ids)
    upto = min(prefix + 1, n, len(ref_top), len(top))  # positions with the same context
    kls = [topk_kl(ref_top[i], top[i]) for i in range(upto)]
    kls = [k for k in kls if not math.isnan(k)]
    return {
        "agreement": agreement(ref_ids, ids),
        "prefix": prefix / n if n else float("nan"),
        "kl": sum(kls) / len(kls) if kls else float("nan"),
        "kl_positions": len(kls),
    }


def second_half_nll(prompt_logprobs: list[float | None]) -> float:
    """Mean negative log-likelihood of the prompt tokens in its second half."""
    n = len(prompt_logprobs)
    values = [v for v in prompt_logprobs[n // 2:] if v is not None]
    if not values:
        return float("nan")
    return -sum(values) / len(values)


def ppl_ratio(strategy_nll: float, full_nll: float) -> float:
    return math.exp(strategy_nll - full_nll)


def forced_fidelity(ref_top: list[dict[int, float]], top: list[dict[int, float]],
                    skip: int = DECODE_PPL_SKIP) -> dict:
    """Teacher-forced fidelity of one continuation to full's: both saw the same tokens (the text's own), so
    every position compares like with like (no early divergence ruins the rest). ``forced_top1``: the share
    of positions where the strategy's most likely next token is full's; ``forced_kl``: mean KL(full ||
    strategy) over full's top-k + other. The first ``skip`` positions come from the prefill and are left out."""
    pairs = [(r, t) for r, t in zip(ref_top[skip:], top[skip:]) if r and t]
    if not pairs:
        return {"forced_top1": float("nan"), "forced_kl": float("nan"), "forced_positions": 0}
    same = sum(max(r, key=r.get) == max(t, key=t.get) for r, t in pairs)
    kls = [k for k in (topk_kl(r, t) for r, t in pairs) if not math.isnan(k)]
    return {"forced_top1": same / len(pairs), "forced_kl": sum(kls) / len(kls) if kls else float("nan"),
            "forced_positions": len(pairs)}


def forced_nll(token_logprobs: list[float | None], skip: int = DECODE_PPL_SKIP) -> float:
    """Mean negative log-likelihood of teacher-forced output tokens, the first `skip` left out
    (the first output token comes from the prefill)."""
    values = [v for v in token_logprobs[skip:] if v is not None]
    if not values:
        return float("nan")
    return -sum(values) / len(values)
