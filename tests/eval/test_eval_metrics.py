"""Fidelity metrics, budget mapping and the recommendation, on constructed inputs."""

from __future__ import annotations

import math

from types import SimpleNamespace

import pytest

import torch

from bench import fidelity as fid
from bench import recommend as rec
from bench import sweep as sw
from strategies.base import ModelFacts


def logs(probs: dict[int, float]) -> dict[int, float]:
    return {t: math.log(p) for t, p in probs.items()}


def test_topk_kl_zero_for_same_and_positive_for_different():
    p = {1: 0.6, 2: 0.3, 3: 0.05}
    assert fid.topk_kl(logs(p), logs(p)) == pytest.approx(0.0, abs=1e-12)
    q = {1: 0.3, 2: 0.6, 3: 0.05}
    # p and q put the same 0.05 on "other": the coarsened KL is the exact KL here
    exact = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.6)
    assert fid.topk_kl(logs(p), logs(q)) == pytest.approx(exact, rel=1e-9)


def test_topk_kl_missing_token_uses_bounded_guess():
    p = {1: 0.5, 2: 0.4}
    q = {1: 0.5, 3: 0.45}  # token 2 is not in the strategy's top-k: q(2) <= min(0.45, 0.05 / 2)
    kl = fid.topk_kl(logs(p), logs(q))
    expected = 0.4 * math.log(0.4 / 0.025) + 0.1 * math.log(0.1 / (1 - 0.5 - 0.025))
    assert kl == pytest.approx(expected, rel=1e-9)


def test_agreement_prefix_and_decode_fidelity():
    ref = [1, 2, 3, 4]
    assert fid.agreement(ref, [1, 2, 9, 4]) == 0.75
    assert fid.common_prefix(ref, [1, 2, 9, 4]) == 2
    top = [{1: -0.1}, {2: -0.1}, {3: -0.1}, {4: -0.1}]
    out = fid.decode_fidelity(ref, top, [1, 2, 9, 4], top)
    assert out["agreement"] == 0.75 and out["prefix"] == 0.5
    assert out["kl_positions"] == 3 and out["kl"] == pytest.approx(0.0, abs=1e-12)


def test_ppl_ratio_from_prompt_logprobs():
    full = [None, -1.0, -1.0, -2.0, -2.0, -2.0]  # the second half: the last three
    worse = [None, -5.0, -5.0, -3.0, -3.0, -3.0]
    ratio = fid.ppl_ratio(fid.second_half_nll(worse), fid.second_half_nll(full))
    assert ratio == pytest.approx(math.e)


def test_decode_nll_leaves_out_the_prefill_token():
    # the first forced token comes from the prefill's forward pass: not a decode step
    assert fid.forced_nll([-9.0, -1.0, -3.0]) == pytest.approx(2.0)
    assert fid.forced_nll([-9.0, -1.0, -3.0], skip=0) == pytest.approx(13.0 / 3)
    assert math.isnan(fid.forced_nll([-1.0]))


def test_text_sample_continuation_is_the_next_text(tokenizer):
    a = fid.text_sample(300, tokenizer, seed=0, index=3)
    assert len(a.continuation_ids) == fid.CONTINUATION_TOKENS
    # the same corpus stream: the prompt followed by its continuation
    docs = fid.corpus_tokens(tokenizer)
    stream = [t for _, _, ids in docs for t in ids]
    stream = stream + stream
    assert stream[a.offset:a.offset + 300 + 64] == a.prompt_ids + a.continuation_ids


def test_text_samples_are_deterministic_natural_text(tokenizer):
    a = fid.text_sample(1000, tokenizer, seed=0, index=1)
    b = fid.text_sample(1000, tokenizer, seed=0, index=1)
    c = fid.text_sample(1000, tokenizer, seed=0, index=2)
    assert a.prompt_ids == b.prompt_ids and len(a.prompt_ids) == 1000
    assert a.prompt_ids != c.prompt_ids
    assert "licen" in tokenizer.decode(a.prompt_ids + c.prompt_ids).lower()


def test_forced_fidelity_compares_every_forced_position():
    full = [logs({1: 0.9, 2: 0.1})] + [logs({1: 0.6, 2: 0.3})] * 4
    same = fid.forced_fidelity(full, full)
    assert same["forced_top1"] == 1.0 and same["forced_kl"] == pytest.approx(0.0, abs=1e-12)
    assert same["forced_positions"] == 4                       # the prefill's position is left out
    flipped = full[:3] + [logs({1: 0.3, 2: 0.6})] * 2          # the last two positions prefer token 2
    out = fid.forced_fidelity(full, flipped)
    assert out["forced_top1"] == pytest.approx(0.5) and out["forced_kl"] > 0.05
    assert math.isnan(fid.forced_fidelity([], [])["forced_top1"])


def test_budget_parsing():
    assert sw.parse_budget("512") == 512 and sw.parse_budget("0.25") == 0.25
    assert isinstance(sw.parse_budget("1.0"), float)
    with pytest.raises(ValueError):
        sw.parse_budget("1.5")
    with pytest.raises(ValueError):
        sw.parse_budget("0")


def test_a_config_asks_the_server_for_its_budget():
    """The eval sends `attention.budget` and leaves the mapping to the server; the fixed params go beside it."""
    assert sw.Config("sink", 0.25, (("n_sink", 64),)).attention() == {
        "strategy": "sink", "params": {"n_sink": 64}, "budget": 0.25}
    assert sw.Config("full", None).attention() == {"strategy": "full", "params": {}}
    assert [c.label for c in sw.build_configs(["full", "sink", "seer"], [0.125, 512], {})] == [
        "full", "sink@0.125", "sink@512", "seer@0.125", "seer@512"]


def test_the_floor_is_a_second_run_of_full_compared_with_the_first():
    """`--floor` adds full#2; the fidelity of every configuration, full#2 included, is measured against the
    first run of full, and full#2 is no control."""
    configs = sw.build_configs(["sink"], [0.125], {}, floor=True)
    assert [(c.label, c.is_control) for c in configs] == [("full", True), ("full#2", False), ("sink@0.125", False)]
    assert configs[1].attention() == configs[0].attention() == {"strategy": "full", "params": {}}
    sample = SimpleNamespace(sample_id=0)
    top = [{1: -0.1, 2: -2.5}] * 8
    other = [{1: -2.5, 2: -0.1}] * 8

    def forced(config, tops):
        return sw.Job("forced", config, 100, sample,
                      result=SimpleNamespace(ok=True, top_logprobs=tops, token_logprobs=[-0.1] * 8))

    jobs = [forced(configs[1], other), forced(configs[0], top), forced(configs[2], top)]
    sw.text_metrics(jobs)
    assert jobs[0].extra["forced_top1"] == 0.0 and jobs[2].extra["forced_top1"] == 1.0
    assert jobs[1].extra["forced_top1"] == 1.0      # the control against itself


SMOL = ModelFacts(30, 9, 3, 64, 128, 8192, torch.float32, "SmolLM2-135M-Instruct")
GEMMA = ModelFacts(18, 4, 1, 256, 128, 32768, torch.float32, "gemma-3-270m",
                   window_layers=tuple(i for i in range(18) if i % 6 != 5), sliding_window=512)


@pytest.mark.parametrize("model", [SMOL, GEMMA], ids=["smollm2", "gemma3"])
@pytest.mark.parametrize("strategy,extra", [("sink", {}), ("sink", {"n_sink": 64}), ("recycled", {}),
                                            ("recycled", {"stride": 50}), ("landmark", {}),
                                            ("landmark", {"dense_layers": 0, "block_size": 32}),
                                            ("seer", {"gates": "identity"})])
@pytest.mark.parametrize("budget", [0.125, 0.25, 1000])
@pytest.mark.parametrize("length", [2048, 4096, 8000])
def test_the_resolved_share_meets_the_budget(strategy, extra, budget, length, model):
    """What the eval reports as a row's share (the server's mapping of the budget, then the strategy's own
    count of those params) is the budget within one block or chunk, never above it by more than 1/64."""
    params, share = sw.Config(strategy, budget, tuple(sorted(extra.items()))).resolved(length, model)
    assert {k: params[k] for k in extra} == extra
    wanted = budget if isinstance(budget, float) else budget / length
    block = {"landmark": 2 * params.get("block_size", 16), "seer": 64, "recycled": 16}.get(strategy, 1)
    assert wanted - block / length - 1e-9 <= share <= wanted + 1 / 64, (params, share)


def test_landmark_counts_only_its_own_dense_layers_on_a_windowed_model():
    """Gemma 3's first layers have a sliding window (vLLM's): landmark's 2 dense layers change nothing
    there, so a 1/8 budget leaves the global layers their whole 1/8 (on SmolLM2 the 2 of 30 dense layers
    take 1/15 of it)."""
    gemma, _ = sw.Config("landmark", 0.125).resolved(8000, GEMMA)
    smol, _ = sw.Config("landmark", 0.125).resolved(8000, SMOL)
    assert gemma["k_blocks"] == int(0.125 * 8000 // 16) - 2
    assert smol["k_blocks"] < gemma["k_blocks"]


def sweep_result() -> dict:
    def row(config, strategy, budget, length, agreement, frac, score=50.0, tpot=10.0):
        return {"config": config, "strategy": strategy, "budget": budget, "length": length,
                "agreement": agreement, "prefix": agreement, "kl": 0.01, "score": score,
                "nominal_fraction": frac, "tpot_ms": tpot, "errors": 0}
    rows = []
    for length in (1024, 4096):
        rows += [row("full", "full", None, length, None, 1.0),
                 row("sink@128", "sink", 128, length, 0.5, 128 / length),
                 row("landmark@0.125", "landmark", 0.125, length, 0.97, 0.17),
                 row("recycled@0.25", "recycled", 0.25, length, 0.99, 0.3)]
    return {"meta": {"model": "m", "configs": [{"label": "landmark@0.125", "extra": {}}]}, "rows": rows}


def test_recommend_cheapest_meeting_floor():
    out = rec.recommend(sweep_result(), 0.95, 4000)
    assert out["measured_length"] == 4096
    assert out["choice"]["config"] == "landmark@0.125"
    assert out["attention"] == {"strategy": "landmark", "params": {}, "budget": 0.125}
    assert rec.recommend(sweep_result(), 0.98, 4000)["choice"]["config"] == "recycled@0.25"
    assert rec.recommend(sweep_result(), 0.999, 4000)["choice"]["config"] == "full"
    assert rec.recommend(sweep_result(), 0.4, 1000)["choice"]["config"] == "sink@128"
    assert rec.recommend(sweep_result(), 0.4, 1000)["measured_length"] == 1024


def test_recommend_max_ppl_ratio():
    result = sweep_result()
    for r in result["rows"]:
        r["decode_ppl_ratio"] = {"sink": 1.01, "landmark": 1.2, "recycled": 1.03}.get(r["strategy"])
        r["prompt_ppl_ratio"] = 1.5 if r["strategy"] == "sink" else None
    assert rec.recommend(result, 0.95, 4000)["choice"]["config"] == "landmark@0.125"
    # landmark's decode ppl ratio is too high; sink's prompt ppl ratio is
    out = rec.recommend(result, 0.4, 4000, max_ppl_ratio=1.05)
    assert out["choice"]["config"] == "recycled@0.25"
    assert {e["config"] for e in out["rejected"]} == {"sink@128", "landmark@0.125"}
    del result["rows"][-1]["decode_ppl_ratio"]  # recycled@0.25 at 4096: not measured
    assert rec.recommend(result, 0.4, 4000, max_ppl_ratio=1.05)["choice"]["config"] == "full"


def test_wilson_interval_of_a_task_score():
    lo, hi = sw.wilson_interval(24, 24)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.862, abs=1e-3)     # 24/24 still allows 86%
    lo, hi = sw.wilson_interval(12, 24)
    assert lo == pytest.approx(0.314, abs=2e-3) and hi == pytest.approx(0.686, abs=2e-3)
    assert sw.wilson_interval(0, 0) is None
    cell = sw.score_cell([100.0] * 20 + [0.0] * 4)
    assert cell["n"] == 24 and cell["mean"] == pytest.approx(100 * 20 / 24)
    assert cell["ci"][0] < cell["mean"] < cell["ci"][1]


def test_scores_are_compared_with_full_only_where_full_passes():
    def row(strategy, length, scores):
        return {"strategy": strategy, "length": length, "task_scores": scores}
    rows = [row("full", 2048, {"passkey": 100.0, "vt": 50.0}), row("landmark", 2048, {"passkey": 90.0, "vt": 50.0}),
            row("full", 4096, {"passkey": 79.0}), row("landmark", 4096, {"passkey": 79.0})]
    sw.mark_against_full(rows)
    assert rows[1]["vs_full"] == {"passkey": 0.9, "vt": None} and rows[1]["full_fails"] == ["vt"]
    assert rows[3]["vs_full"] == {"passkey": None} and rows[3]["full_fails"] == ["passkey"]


def test_the_report_is_rebuilt_from_a_runs_raw_data(tmp_path):
    """`attnserve eval --report-from DIR`: rows, tables and the doc again from sweep.json + outputs.jsonl."""
    import json

    def record(config, strategy, budget, score):
        return {"kind": "task", "config": config, "strategy": strategy, "budget": budget, "length": 1024,
                "task": "passkey", "ok": True, "score": score, "prompt_len": 1000, "tpot_s": 0.01,
                "ttft_s": 0.1, "attention": {"attended_fraction": 0.5, "decode_attended_fraction": 0.2}}
    records = [record("full", "full", None, 100.0)] * 24 + [record("sink@0.125", "sink", 0.125, 0.0)] * 24
    meta = {"date": "d", "machine": "m", "model": "gemma-3-270m", "max_model_len": 2048, "requests": 48,
            "elapsed_s": 1.0, "concurrency": 4, "errors": 0, "tasks": ["passkey"], "depths": [0.5], "samples": 24,
            "fidelity_samples": 0, "seed": 0, "lengths": [1024], "num_layers": 18, "command": "attnserve eval ...",
            "configs": [{"label": "full", "strategy": "full", "budget": None, "extra": {}},
                        {"label": "sink@0.125", "strategy": "sink", "budget": 0.125, "extra": {}}]}
    (tmp_path / "sweep.json").write_text(json.dumps({"meta": meta, "rows": []}))
    (tmp_path / "outputs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    doc = tmp_path / "doc" / "results.md"
    assert sw.main(["--report-from", str(tmp_path), "--doc", str(doc)]) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "sweep.json").read_text())["rows"]}
    assert rows["full"]["task_cells"]["passkey"]["n"] == 24 and rows["sink@0.125"]["vs_full"] == {"passkey": 0.0}
    assert rows["sink@0.125"]["decode_attended_fraction"] == pytest.approx(0.2)
    text = doc.read_text()
    assert text.startswith("# Evaluation results: gemma-3-270m")
    assert "| full | 1024 | 1.000 | 0.200 | 100.0 [86–100] | 1.00 | 24 |" in text
    assert "| sink@0.125 | 1024 | 0.125 | 0.200 | 0.0 [0–14] | 0.00 | 24 |" in text


def test_copy_share_counts_the_continuations_windows_found_in_the_prompt():
    from bench.copy_split import copy_share

    prompt = list(range(100))
    assert copy_share(prompt, list(range(40, 60))) == 1.0
    assert copy_share(prompt, list(range(200, 220))) == 0.0
    # 13 windows of 8 in a 20-token continuation; the first 5 (starting at 88..92) lie inside the prompt
    assert copy_share(prompt, list(range(88, 108))) == pytest.approx(5 / 13)
    assert copy_share(prompt, [1, 2, 3]) == 0.0
