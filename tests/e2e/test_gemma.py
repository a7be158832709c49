"""Every strategy on Gemma 3 270M inside the real vLLM engine (issue 22, item 2).

Gemma 3: 18 layers, 15 with a sliding window of 512 (a global layer every 6th), 4 query heads on one KV
head, head size 256, scores scaled by ``query_pre_attn_scalar ** -0.5``. vLLM runs the sliding-window
layers with its own windowed kernel for every request (and, with the hybrid KV cache manager, frees the
blocks behind the window); the strategies run on the global layers (docs/design.md, "Sliding-window
layers"). Checked here: a budget covering the context gives ``full``'s tokens and logprobs, and a 1/8
budget on a ~1.5k-token passkey prompt still writes text (before the fix ``landmark`` wrote markup,
"<em><strong>...", having attended past the window on the windowed layers)."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import NEAR_TIE_NATS, assert_same_greedy, built_engine, fresh_prompts

pytestmark = pytest.mark.timeout(600)

PAGE = 64          # the shipped seer gates score blocks of 64 tokens, which must divide the KV page
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(scope="module")
def gemma(gemma_model_dir):
    """In its own processes: the routing backend's router is one per process, and this process's already
    serves the shared SmolLM2 engine (the windowed layers and scale it reads from Gemma's layers are
    checked without an engine in tests/strategies/test_backend_router.py)."""
    with built_engine({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, model=str(gemma_model_dir), enforce_eager=True, max_model_len=2048,
                      kv_cache_memory_bytes=192 << 20, max_num_seqs=8, max_num_batched_tokens=8192,
                      block_size=PAGE, seed=0) as llm:
        yield llm


def sampling(attention: dict, max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                          extra_args={"attention": attention})


def generate(llm, prompts: list[list[int]], params: list) -> list:
    outs = llm.generate(fresh_prompts(prompts), params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def passkey_prompt(tokenizer, tokens: int, key: int) -> list[int]:
    """~``tokens`` tokens (BOS first, as the prepared tokenizer adds it): filler with the key at 1/3."""
    unit = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def encode(repeats: int) -> list[int]:
        return tokenizer(FILLER * (repeats // 3) + needle + FILLER * (repeats - repeats // 3)
                         + "What is the pass key? The pass key is")["input_ids"]

    repeats = max(2, tokens // unit)
    repeats = max(2, repeats + (tokens - len(encode(repeats))) // unit)
    ids = encode(repeats)
    assert ids[0] == tokenizer.bos_token_id
    return ids


WHOLE = [{"strategy": "sink", "params": {"n_sink": 4, "window": 4096}},
         {"strategy": "recycled", "params": {"k": 1.0, "stride": 4, "refresh_threshold": None}},
         {"strategy": "landmark", "params": {"k_blocks": 1.0, "dense_layers": 0, "block_size": 16}},
         {"strategy": "seer", "params": {"block_size": 32, "top_k": 1.0, "gates": "identity"}}]

EIGHTH = [{"strategy": "sink", "params": {"n_sink": 4, "window": 192}},
          {"strategy": "recycled", "params": {"k": 0.125, "stride": 16, "refresh_threshold": None}},
          {"strategy": "landmark", "params": {"k_blocks": 0.125, "dense_layers": 0, "block_size": 16}},
          {"strategy": "seer", "params": {"block_size": 32, "top_k": 0.125, "gates": "identity"}}]


def test_budget_covering_the_context_gives_full_attention(gemma):
    """~700 tokens (past the window of 512): every strategy at a whole budget follows ``full`` in the same
    batch (the windowed layers attend their window whatever the strategy)."""
    prompt = passkey_prompt(gemma.get_tokenizer(), 700, 40721)
    full, *outs = generate(gemma, [prompt] * (1 + len(WHOLE)),
                           [sampling(c, 4, logprobs=2) for c in [{"strategy": "full", "params": {}}, *WHOLE]])
    for choice, out in zip(WHOLE, outs):
        assert_same_greedy(out, full, f"{choice}")


def looks_like_text(text: str) -> bool:
    """Words, digits and punctuation: no markup, mostly letters / digits / spaces."""
    if re.search(r"<[a-zA-Z/]", text) or not text.strip():
        return False
    plain = sum(ch.isalnum() or ch.isspace() for ch in text)
    return plain >= 0.75 * len(text)


def test_an_eighth_of_the_context_still_writes_text(gemma):
    """A ~1.5k-token passkey prompt, each strategy at a 1/8 budget beside ``full``: text, not markup."""
    tokenizer = gemma.get_tokenizer()
    prompt = passkey_prompt(tokenizer, 1500, 68351)
    assert 1400 <= len(prompt) <= 1600
    choices = [{"strategy": "full", "params": {}}, *EIGHTH]
    outs = generate(gemma, [prompt] * len(choices), [sampling(c, 12) for c in choices])
    texts = {c["strategy"]: tokenizer.decode(o.token_ids) for c, o in zip(choices, outs)}
    print("1/8 budget, ~1.5k tokens:", texts)
    assert looks_like_text(texts["full"]), texts
    bad = {name: text for name, text in texts.items() if not looks_like_text(text)}
    assert not bad, f"not text: {bad} (all: {texts})"


def test_seer_with_the_shipped_gates_finds_the_pass_key(gemma):
    """``seer`` with the model's default gates (those shipped in strategies/data/gemma-3-270m, unless the
    gates dir holds a calibration of its own) at a 1/8 budget and ``prefill: dense`` (SeerAttention-R: the
    prompt goes to vLLM's dense kernel, beside ``full``'s rows) answers a ~1.5k-token passkey prompt as
    ``full`` does in the same batch, from ``full``'s first token. (With the gated prefill the prompt's KV
    and its last position come from the prefill gate's 1/8 of the blocks: on this prompt seer then answers
    " 1234567", docs/seer.md.)"""
    tokenizer = gemma.get_tokenizer()
    key = 52907
    prompt = passkey_prompt(tokenizer, 1500, key)
    choices = [{"strategy": "full", "params": {}},
               {"strategy": "seer", "params": {"top_k": 0.125, "prefill": "dense"}}]
    full, seer = generate(gemma, [prompt] * len(choices), [sampling(c, 8, logprobs=1) for c in choices])
    assert str(key) in tokenizer.decode(full.token_ids), tokenizer.decode(full.token_ids)
    assert str(key) in tokenizer.decode(seer.token_ids), (tokenizer.decode(seer.token_ids), full)
    first = seer.token_ids[0]       # from the dense prefill: full's, up to vLLM's batch-shape floor (the
    assert first == full.token_ids[0]   # seer row may reuse full's prompt blocks from the prefix cache)
    assert abs(seer.logprobs[0][first].logprob - full.logprobs[0][first].logprob) <= NEAR_TIE_NATS
