"""The load mix: weighted choices of strategy, API and prompt length, and the synthetic prompts.

Kept free of Locust and gevent so that the report command and the tests can import it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

# The four request shapes a user sends: OpenAI chat or completions, streamed or not.
APIS = ("chat", "chat-stream", "completions", "completions-stream")
DEFAULT_APIS = "chat-stream:2,completions-stream:1,chat:1,completions:1"
DEFAULT_STRATEGIES = "full:1"
DEFAULT_PROMPT_LENGTHS = "32:2,128:1"

# Common English words that the embedded model's tokenizer (and most BPE tokenizers) keep as one
# token each with their leading space: N words make roughly N prompt tokens.
WORDS = (
    "the of and to in is was for on that with as by at from his her an be are were which this "
    "have had not but one all new first two after also they their more time year years been "
    "other over into only some when most made may like many such three during where its used "
    "well then while state city world long part people work life house water game team war "
    "school name place known found high area small great early later four five light power "
    "music group church river line film book road south north west east home story day night"
).split()


def parse_weights(text: str, what: str, allowed: tuple[str, ...] | None = None) -> dict[str, float]:
    """`a:2,b:1,c` → {"a": 2.0, "b": 1.0, "c": 1.0}; a missing weight is 1."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, weight = part.partition(":")
        name = name.strip()
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"{what}: weight of {name!r} is not a number: {weight!r}") from None
        if not name or value <= 0:
            raise ValueError(f"{what}: expected NAME[:WEIGHT>0], got {part!r}")
        if allowed is not None and name not in allowed:
            raise ValueError(f"{what}: unknown {name!r}; valid: {', '.join(allowed)}")
        weights[name] = weights.get(name, 0.0) + value
    if not weights:
        raise ValueError(f"{what}: empty")
    return weights


def parse_lengths(text: str) -> dict[int, float]:
    """`32:2,128` → {32: 2.0, 128: 1.0} (prompt lengths in tokens, roughly)."""
    out: dict[int, float] = {}
    for name, weight in parse_weights(text, "prompt lengths").items():
        try:
            length = int(name)
        except ValueError:
            raise ValueError(f"prompt lengths: {name!r} is not an integer") from None
        if length < 1:
            raise ValueError(f"prompt lengths: {length} must be >= 1")
        out[length] = weight
    return out


def format_weights(weights: dict) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in weights.items())


@dataclass(frozen=True)
class Mix:
    strategies: dict[str, float]
    apis: dict[str, float]
    prompt_lengths: dict[int, float]
    max_tokens: int = 16
    # Per-strategy params sent with each request of that strategy ({} = the server's defaults).
    params: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        strategies: str = DEFAULT_STRATEGIES,
        apis: str = DEFAULT_APIS,
        prompt_lengths: str = DEFAULT_PROMPT_LENGTHS,
        max_tokens: int = 16,
        params: str | dict | None = None,
    ) -> Mix:
        if isinstance(params, str):
            params = json.loads(params) if params.strip() else {}
        params = params or {}
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise ValueError('strategy params: expected {"strategy": {"param": value}, ...}')
        if max_tokens < 1:
            raise ValueError("max tokens must be >= 1")
        mix = cls(
            strategies=parse_weights(strategies, "strategies"),
            apis=parse_weights(apis, "apis", APIS),
            prompt_lengths=parse_lengths(prompt_lengths),
            max_tokens=max_tokens,
            params=params,
        )
        unknown = set(mix.params) - set(mix.strategies)
        if unknown:
            raise ValueError(f"strategy params given for strategies not in the mix: {sorted(unknown)}")
        return mix

    def attention(self, strategy: str) -> dict:
        out: dict = {"strategy": strategy}
        if self.params.get(strategy):
            out["params"] = self.params[strategy]
        return out


def pick(weights: dict, rng: random.Random):
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]


def make_prompt(n_tokens: int, rng: random.Random) -> str:
    """About `n_tokens` tokens of random common words (distinct per request: no prefix-cache hits
    beyond the chat template)."""
    return " ".join(rng.choice(WORDS) for _ in range(n_tokens))
