"""Teacher forcing (`vllm_xargs.attnserve_force_tokens`, strategies/engine/forcing.py) through the real
server: the output is the forced tokens, and their logprobs are the model's raw ones (computed
before the forcing processor), so a forced continuation's NLL is the strategy's own."""

from __future__ import annotations

import pytest

COMPLETIONS = "/v1/completions"
PROMPT = ("The licence grants you the right to copy, modify and distribute the software, provided "
          "that the notice above is kept in every copy. ")
CONTINUATION = ("You may charge a fee for the physical act of transferring a copy, and you may at "
                "your option offer warranty protection in exchange for a fee.")


def complete(http, model, prompt, max_tokens, force=None, **fields):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True, **fields}
    if force is not None:
        body["vllm_xargs"] = {"attnserve_force_tokens": force}
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    ids = [int(t.rsplit(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
    return ids, choice["logprobs"]["token_logprobs"], response.json()


@pytest.fixture(scope="module")
def texts(tokenizer):
    return (tokenizer(PROMPT, add_special_tokens=False).input_ids,
            tokenizer(CONTINUATION, add_special_tokens=False).input_ids)


def test_forcing_returns_exactly_the_forced_tokens(http, attnserve_server, texts):
    prompt, continuation = texts
    ids, logprobs, body = complete(http, attnserve_server.model, prompt, len(continuation),
                                   force=continuation,
                                   attention={"strategy": "sink", "params": {"window": 16}})
    assert ids == continuation
    assert body["attention"]["strategy"] == "sink"
    # random sampling is forced too; past the list the request samples as usual
    ids, _, _ = complete(http, attnserve_server.model, prompt, 6, force=continuation[:3],
                         temperature=1.0, seed=7)
    assert ids[:3] == continuation[:3] and len(ids) == 6


def test_forced_greedy_tokens_reproduce_the_unforced_logprobs(http, attnserve_server, texts):
    prompt, _ = texts
    greedy, greedy_lp, _ = complete(http, attnserve_server.model, prompt, 24)
    forced, forced_lp, _ = complete(http, attnserve_server.model, prompt, 24, force=greedy)
    assert forced == greedy
    assert forced_lp == pytest.approx(greedy_lp, abs=1e-4)


def test_forced_logprobs_are_the_models_raw_ones(http, attnserve_server, texts):
    """A forced natural continuation (mostly not the greedy tokens) scores as the same tokens do
    in the prompt under full attention (prompt_logprobs, from the prefill): the forcing processor
    (whose processed logprob of the forced token would be 0) does not touch the returned values."""
    prompt, continuation = texts
    forced, forced_lp, _ = complete(http, attnserve_server.model, prompt, len(continuation),
                                    force=continuation)
    assert forced == continuation
    response = http.post(COMPLETIONS, json={
        "model": attnserve_server.model, "prompt": prompt + continuation, "max_tokens": 1,
        "prompt_logprobs": 0, "temperature": 0.0})
    assert response.status_code == 200, response.text
    entries = response.json()["choices"][0]["prompt_logprobs"][len(prompt):]
    prefill_lp = [entry[str(token)]["logprob"] for entry, token in zip(entries, continuation)]
    assert sum(1 for v in forced_lp if v < -1.0) >= len(continuation) // 4  # not 0: raw values
    # decode (one token at a time) vs prefill kernels: the same numbers up to rounding
    diffs = [abs(a - b) for a, b in zip(forced_lp, prefill_lp)]
    assert sum(diffs) / len(diffs) < 0.1 and max(diffs) < 0.5, diffs
    nll_forced = -sum(forced_lp) / len(forced_lp)
    nll_prefill = -sum(prefill_lp) / len(prefill_lp)
    assert nll_forced == pytest.approx(nll_prefill, rel=0.02)
