"""`attnserve eval`: sweeps strategy x budget x prompt length through a running server.

For each prompt length it generates the RULER-style tasks of `bench.tasks` and the natural-text
fidelity prompts of `bench.fidelity`, sends every (configuration, prompt) concurrently (a tqdm bar
counts them), and writes to `--out`:

- `sweep.json`: the measured rows (one per configuration and length) and how they were produced;
- `outputs.jsonl`: every request with the model's output, references, score, timings and the
  server's `attention` report, for inspection;
- `results.md`: the tables; `score_vs_budget.png`, `fidelity_vs_length.png`, `tpot_vs_length.png`.

A *budget* is the request's `attention.budget`: KV tokens attended per decode step (an integer) or a
share of the context (a float in (0, 1]). The server maps it onto each strategy's own params at the
prompt's length (`Strategy.params_for_budget`, counting sinks, newest blocks, dense layers and full
steps); `nominal_fraction` is the share those params attend (`Strategy.decode_share`), next to the share
the server measured.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import fidelity as fid
from bench import tasks as tk
from bench.client import Client, Completion, add_server_arguments, gather_limited, load_tokenizer, server_from_args
from strategies.base import ModelFacts
from strategies.registry import FULL, get, parse_attention

DEFAULT_STRATEGIES = "full,sink,recycled,landmark,seer"
DEFAULT_BUDGETS = "256,1024,0.125,0.25"
DEFAULT_LENGTHS = "1024,2048,4096"


# -- configurations ---------------------------------------------------------------------------------


def parse_budget(text: str) -> int | float:
    text = text.strip()
    if not text:
        raise ValueError("empty budget")
    if any(c in text for c in ".eE"):
        value = float(text)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a fractional budget must be in (0, 1], got {text}")
        return value
    value = int(text)
    if value < 1:
        raise ValueError(f"a token budget must be >= 1, got {text}")
    return value


def parse_list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def format_budget(budget: int | float | None) -> str:
    if budget is None:
        return "-"
    return f"{budget:g}" if isinstance(budget, float) else str(budget)


@dataclass(frozen=True)
class Config:
    strategy: str
    budget: int | float | None
    extra: tuple[tuple[str, Any], ...] = ()
    replica: int = 0        # 1: a second run of the same configuration (the floor of two runs of `full`)

    @property
    def label(self) -> str:
        label = self.strategy if self.budget is None else f"{self.strategy}@{format_budget(self.budget)}"
        return f"{label}#{self.replica + 1}" if self.replica else label

    @property
    def is_control(self) -> bool:
        """The run of `full` every other configuration is compared with."""
        return self.strategy == FULL and not self.replica

    @property
    def extra_dict(self) -> dict:
        return dict(self.extra)

    def attention(self) -> dict:
        """The request's `attention` object: the budget as `attention.budget` (the server maps it onto the
        strategy's own params at the prompt's length), the fixed params beside it."""
        attention = {"strategy": self.strategy, "params": self.extra_dict}
        if self.budget is not None:
            attention["budget"] = self.budget
        return attention

    def resolved(self, length: int, model: ModelFacts) -> tuple[dict, float]:
        """(the params a `length`-token prompt runs with, the share of its context a decode step attends
        under them: `Strategy.decode_share`, on the layers strategies route), as the server computes them."""
        choice = parse_attention(self.attention()).for_context(length, model)
        return choice.params.to_dict(), get(self.strategy).decode_share(choice.params, length, model)


def build_configs(strategies: list[str], budgets: list[int | float], extra: dict[str, dict],
                  floor: bool = False) -> list[Config]:
    """The control first (with its fixed params, if any), with ``floor`` a second run of it (``full#2``:
    its fidelity to the first is what two runs of the same dense attention in different batches agree
    on), then each strategy at each budget (strategies that take no budget once)."""
    control = Config(FULL, None, tuple(sorted(extra.get(FULL, {}).items())))
    configs = [control] + ([replace(control, replica=1)] if floor else [])
    for name in strategies:
        if name == FULL:
            continue
        items = tuple(sorted(extra.get(name, {}).items()))
        if budgets and get(name).budget_param is not None:
            configs += [Config(name, b, items) for b in budgets]
        else:
            configs.append(Config(name, None, items))
    return configs


def parse_strategy_params(values: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for text in values:
        name, sep, raw = text.partition("=")
        if not sep:
            raise ValueError(f"--strategy-params expects NAME=JSON, got {text!r}")
        params = json.loads(raw)
        if not isinstance(params, dict):
            raise ValueError(f"--strategy-params {name}: expected a JSON object")
        out.setdefault(name.strip(), {}).update(params)
    return out


# -- running -------------------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str  # "task" | "text" | "ppl" (prompt logprobs) | "forced" (teacher-forced continuation)
    config: Config
    length: int
    sample: Any
    result: Completion | None = None
    extra: dict = field(default_factory=dict)


async def run_job(client: Client, job: Job) -> Job:
    attention = job.config.attention()
    if job.kind == "task":
        job.result = await client.complete(job.sample.prompt_ids, job.sample.max_tokens, attention)
    elif job.kind == "text":
        job.result = await client.complete(job.sample.prompt_ids, fid.CONTINUATION_TOKENS, attention,
                                           logprobs=fid.TOP_LOGPROBS, ignore_eos=True)
    elif job.kind == "forced":
        job.result = await client.complete(job.sample.prompt_ids, len(job.sample.continuation_ids),
                                           attention, logprobs=fid.TOP_LOGPROBS, ignore_eos=True, stream=False,
                                           force_tokens=job.sample.continuation_ids)
        if job.result.ok and job.result.token_ids != job.sample.continuation_ids:
            job.result.ok = False
            job.result.error = "the server did not return the forced tokens"
    else:
        job.result = await client.complete(job.sample.prompt_ids, 1, attention, prompt_logprobs=0,
                                           stream=False)
    return job


async def run_jobs(base_url: str, model: str | None, jobs: list[Job], concurrency: int,
                   progress: bool = True) -> None:
    from tqdm import tqdm

    async with Client(base_url, model=model) as client:
        with tqdm(total=len(jobs), desc="eval requests", unit="req", disable=not progress,
                  file=sys.stderr) as bar:
            await gather_limited([run_job(client, job) for job in jobs], concurrency, bar)


def job_record(job: Job, tokenizer) -> dict:
    r = job.result
    record: dict[str, Any] = {
        "kind": job.kind, "config": job.config.label, "strategy": job.config.strategy,
        "budget": job.config.budget, "params": job.config.extra_dict, "length": job.length,
        "sample_id": job.sample.sample_id, "prompt_len": len(job.sample.prompt_ids),
        "ok": bool(r and r.ok), "error": r.error if r else "not run",
    }
    if job.kind == "task":
        record.update(task=job.sample.task, depth=job.sample.depth, references=job.sample.references,
                      needle_depths=job.sample.needle_depths)
    if job.kind == "forced":
        record["forced_tokens"] = len(job.sample.continuation_ids)
    if r is not None and r.ok:
        record.update(output=r.text, finish_reason=r.finish_reason, completion_tokens=r.completion_tokens,
                      ttft_s=r.ttft_s, tpot_s=r.tpot_s, e2e_s=r.e2e_s, attention=r.attention)
        if job.kind == "task":
            record["score"] = tk.string_match_all(r.text, job.sample.references)
        if job.kind == "text":
            record["token_ids"] = r.token_ids
        if job.kind == "forced":
            record["token_logprobs"] = r.token_logprobs
        record.update(job.extra)
    return record


def text_metrics(jobs: list[Job]) -> None:
    """Fill `extra` of text/ppl/forced jobs with their fidelity to the full job of the same prompt
    (agreement/prefix/KL; prompt ppl ratio; decode ppl ratio of the teacher-forced continuation)."""
    full_text = {(j.length, j.sample.sample_id): j for j in jobs
                 if j.kind == "text" and j.config.is_control and j.result and j.result.ok}
    full_ppl = {(j.length, j.sample.sample_id): j for j in jobs
                if j.kind == "ppl" and j.config.is_control and j.result and j.result.ok}
    full_forced = {(j.length, j.sample.sample_id): j for j in jobs
                   if j.kind == "forced" and j.config.is_control and j.result and j.result.ok}
    for job in jobs:
        if not (job.result and job.result.ok):
            continue
        key = (job.length, job.sample.sample_id)
        if job.kind == "text" and key in full_text:
            ref = full_text[key].result
            job.extra.update(fid.decode_fidelity(ref.token_ids, ref.top_logprobs,
                                                 job.result.token_ids, job.result.top_logprobs))
        elif job.kind == "ppl" and key in full_ppl and job.result.prompt_logprobs:
            nll = fid.second_half_nll(job.result.prompt_logprobs)
            full_nll = fid.second_half_nll(full_ppl[key].result.prompt_logprobs)
            job.extra.update(nll=nll, prompt_ppl_ratio=fid.ppl_ratio(nll, full_nll))
        elif job.kind == "forced" and key in full_forced:
            nll = fid.forced_nll(job.result.token_logprobs)
            full_nll = fid.forced_nll(full_forced[key].result.token_logprobs)
            job.extra.update(decode_nll=nll, decode_ppl_ratio=fid.ppl_ratio(nll, full_nll))
            job.extra.update(fid.forced_fidelity(full_forced[key].result.top_logprobs, job.result.top_logprobs))


FULL_PASSES = 80.0   # a cell counts only where `full` scores at least this (else "full fails")
Z95 = 1.959964


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion, in [0, 1] (scores in [0, 1] summed as successes:
    exact for pass/fail tasks, an approximation for the fractional multi-reference scores)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_cell(scores: list[float]) -> dict:
    """Mean task score (x100), its 95% interval (x100) and the sample count."""
    ci = wilson_interval(sum(scores) / 100.0, len(scores))
    return {"mean": mean(scores), "ci": None if ci is None else [100 * ci[0], 100 * ci[1]], "n": len(scores)}


def finite(values: list[float | None]) -> list[float]:
    """The values that are numbers (no None, no NaN)."""
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean(values: list[float]) -> float | None:
    values = finite(values)
    return sum(values) / len(values) if values else None


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(records: list[dict], configs: list[Config], lengths: list[int], model: ModelFacts) -> list[dict]:
    by_key: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for rec in records:
        by_key[(rec["config"], rec["length"])].append(rec)
    rows = []
    for config in configs:
        for length in lengths:
            recs = by_key.get((config.label, length), [])
            if not recs:
                continue
            ok = [r for r in recs if r["ok"]]
            task_recs = [r for r in ok if r["kind"] == "task"]
            per_task: dict[str, list[float]] = defaultdict(list)
            for r in task_recs:
                per_task[r["task"]].append(r["score"])
            task_scores = {t: mean(v) for t, v in sorted(per_task.items())}
            task_cells = {t: score_cell(v) for t, v in sorted(per_task.items())}
            text = [r for r in ok if r["kind"] == "text"]
            ppl = [r for r in ok if r["kind"] == "ppl"]
            forced = [r for r in ok if r["kind"] == "forced"]
            decode_nll = mean([r.get("decode_nll") for r in forced])
            timed = text or task_recs
            params, share = config.resolved(length, model)
            rows.append({
                "config": config.label, "strategy": config.strategy, "budget": config.budget,
                "params": params, "length": length,
                "prompt_len": mean([r["prompt_len"] for r in recs]),
                "nominal_fraction": share,
                "attended_fraction": mean([(r.get("attention") or {}).get("attended_fraction") for r in ok]),
                "decode_attended_fraction": mean([(r.get("attention") or {}).get("decode_attended_fraction")
                                                  for r in ok]),
                "task_scores": task_scores, "task_cells": task_cells,
                "score": mean(list(task_scores.values())) if task_scores else None,
                "n_task_samples": len(task_recs),
                "agreement": mean([r.get("agreement") for r in text]),
                "prefix": mean([r.get("prefix") for r in text]),
                "kl": mean([r.get("kl") for r in text]),
                "decode_ppl_ratio": mean([r.get("decode_ppl_ratio") for r in forced]),
                "forced_top1": mean([r.get("forced_top1") for r in forced]),
                "forced_top1_min": min(finite([r.get("forced_top1") for r in forced]), default=None),
                "forced_kl": mean([r.get("forced_kl") for r in forced]),
                "forced_kl_max": max(finite([r.get("forced_kl") for r in forced]), default=None),
                "decode_ppl": None if decode_nll is None else math.exp(decode_nll),
                "prompt_ppl_ratio": mean([r.get("prompt_ppl_ratio") for r in ppl]),
                "n_text_samples": len(text),
                "n_forced_samples": len(forced),
                "tpot_ms": None if median([r.get("tpot_s") for r in timed]) is None
                else 1000 * median([r.get("tpot_s") for r in timed]),
                "ttft_ms": None if median([r.get("ttft_s") for r in timed]) is None
                else 1000 * median([r.get("ttft_s") for r in timed]),
                "errors": len(recs) - len(ok),
                "first_error": next((r["error"] for r in recs if not r["ok"]), None),
            })
    mark_against_full(rows)
    return rows


def control_row(row: dict) -> bool:
    """The row of the first run of `full` (not a `--floor` replica, full#2)."""
    return row.get("config", row["strategy"]) == FULL


def mark_against_full(rows: list[dict]) -> None:
    """Per row and task: `full`'s score at the same length, and the row's score over it where `full`
    passes (>= FULL_PASSES), else None with the task listed in `full_fails` (the cell measures the
    task's difficulty for the model, not the strategy's loss)."""
    full = {r["length"]: r for r in rows if control_row(r)}
    for r in rows:
        reference = full.get(r["length"])
        r["vs_full"], r["full_fails"] = {}, []
        for task, score in r["task_scores"].items():
            full_score = reference["task_scores"].get(task) if reference else None
            if full_score is None or full_score < FULL_PASSES:
                r["full_fails"].append(task)
                r["vs_full"][task] = None
            else:
                r["vs_full"][task] = None if score is None else score / full_score


def command_line(args: argparse.Namespace) -> str:
    """The `attnserve eval` command that reproduces this run (a running server's URL is replaced
    by --start-server)."""
    import shlex

    parts = ["attnserve", "eval", "--start-server"]
    for value in args.serve_args:
        parts.append(f"--serve-arg={value}")
    for name in ("tokenizer", "strategies", "budgets", "lengths", "tasks", "depths", "samples", "fidelity_samples",
                 "concurrency", "seed", "out", "doc"):
        value = getattr(args, name, None)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    for value in args.strategy_params:
        parts += ["--strategy-params", value]
    if not args.ppl:
        parts.append("--no-ppl")
    if not args.decode_ppl:
        parts.append("--no-decode-ppl")
    if not getattr(args, "greedy_text", True):
        parts.append("--no-greedy-text")
    if args.ppl_all:
        parts.append("--ppl-all")
    if args.floor:
        parts.append("--floor")
    return " ".join(shlex.quote(p) for p in parts)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    accel = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            accel = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - only a description
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{mem}, {accel}, {platform.system()} {platform.release()}"


def model_facts(tokenizer_path: str | None) -> ModelFacts:
    """The served model's shapes (layers, sliding windows) from its folder (the embedded model's when
    None), for the budget arithmetic the server does too."""
    if tokenizer_path is None:
        from server.model import embedded_model_dir

        return ModelFacts.from_model_dir(embedded_model_dir())
    return ModelFacts.from_model_dir(tokenizer_path)


async def server_info(base_url: str, model: str | None) -> tuple[dict, dict]:
    async with Client(base_url, model=model) as client:
        models = await client.models()
        try:
            strategies = await client.strategies()
        except Exception:  # noqa: BLE001 - a server without GET /v1/strategies
            strategies = {}
        model_card = next((m for m in models if m["id"] == client.model), models[0])
    return model_card, strategies


def served_model_folder(model_card: dict) -> str | None:
    """The served model's local folder (vLLM's model card ``root``), whose tokenizer the prompts need;
    None (the embedded model's) when the server serves something else."""
    root = model_card.get("root")
    return root if root and Path(root, "config.json").is_file() else None


def run_sweep(args: argparse.Namespace, base_url: str) -> dict:
    model_card, offered = asyncio.run(server_info(base_url, args.model))
    tokenizer_path = args.tokenizer or served_model_folder(model_card)
    tokenizer = load_tokenizer(tokenizer_path)
    max_len = int(model_card.get("max_model_len") or 0)
    lengths = parse_list(args.lengths, int)
    too_long = [L for L in lengths if max_len and L + fid.CONTINUATION_TOKENS > max_len]
    if too_long:
        raise SystemExit(f"lengths {too_long} + {fid.CONTINUATION_TOKENS} output tokens exceed the server's "
                         f"max_model_len {max_len}")
    wanted = parse_list(args.strategies)
    skipped: dict[str, str] = {}
    strategies = []
    for name in wanted:
        if offered and name not in offered:
            skipped[name] = "not offered by the server"
        elif offered and not offered[name].get("available", True):
            skipped[name] = "; ".join(offered[name].get("unsupported_reasons") or ["unavailable"])
        else:
            strategies.append(name)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    budgets = [parse_budget(b) for b in parse_list(args.budgets)] if args.budgets else []
    configs = build_configs(strategies, budgets, parse_strategy_params(args.strategy_params), args.floor)
    task_names = parse_list(args.tasks) if args.tasks else []
    depths = parse_list(args.depths, float)

    jobs: list[Job] = []
    for length in lengths:
        samples = tk.generate_all(task_names, [length], depths, args.samples, tokenizer, args.seed)
        texts = [fid.text_sample(length, tokenizer, args.seed, i) for i in range(args.fidelity_samples)]
        for config in configs:
            jobs += [Job("task", config, length, s) for s in samples]
            if args.greedy_text:
                jobs += [Job("text", config, length, t) for t in texts]
            sparse_prefill = not (offered.get(config.strategy) or {}).get("dense_prefill", True)
            if args.ppl and (config.strategy == FULL or sparse_prefill or args.ppl_all):
                jobs += [Job("ppl", config, length, t) for t in texts]
            if args.decode_ppl:
                jobs += [Job("forced", config, length, t) for t in texts]
    # Longest prompts first, so the tail of the run is short requests; the configurations of one prompt
    # next to each other, so that the dense-prefill strategies find its KV in the prefix cache (one
    # prefill per prompt instead of one per configuration: ~4x fewer prompt tokens with 4 strategies).
    order = {c.label: i for i, c in enumerate(configs)}
    jobs.sort(key=lambda j: (-j.length, j.kind, j.sample.sample_id, order[j.config.label]))
    print(f"{len(jobs)} requests: {len(configs)} configurations x lengths {lengths} "
          f"({len(task_names)} tasks x {len(depths)} depths x {args.samples} samples, "
          f"{args.fidelity_samples} fidelity texts) at concurrency {args.concurrency}", file=sys.stderr)
    started = dt.datetime.now(dt.timezone.utc)
    asyncio.run(run_jobs(base_url, args.model, jobs, args.concurrency, progress=not args.quiet))
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    text_metrics(jobs)
    records = [job_record(j, tokenizer) for j in jobs]
    model = model_facts(tokenizer_path)
    rows = aggregate(records, configs, lengths, model)
    result = {
        "meta": {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "elapsed_s": round(elapsed, 1),
            "machine": machine_description(),
            "model": model_card.get("id"),
            "model_folder": tokenizer_path,
            "max_model_len": max_len,
            "command": command_line(args),
            "lengths": lengths, "budgets": budgets, "strategies": strategies, "skipped": skipped,
            "tasks": task_names, "depths": depths, "samples": args.samples,
            "fidelity_samples": args.fidelity_samples, "seed": args.seed, "concurrency": args.concurrency,
            "configs": [{"label": c.label, "strategy": c.strategy, "budget": c.budget, "extra": c.extra_dict}
                        for c in configs],
            "dense_prefill": {n: (offered.get(n) or {}).get("dense_prefill") for n in strategies},
            "requests": len(jobs), "errors": sum(1 for r in records if not r["ok"]), "num_layers": model.num_layers,
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "outputs.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, Path(args.doc) if getattr(args, "doc", None) else None)
    return result


# -- report -------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict, plots: list[str]) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Run {meta['date']} on {meta['machine']}; model {meta['model']} (max_model_len "
        f"{meta['max_model_len']}); {meta['requests']} requests in {meta['elapsed_s']:.0f} s at concurrency "
        f"{meta['concurrency']}, {meta['errors']} failed.",
        "",
        f"Tasks {', '.join(meta['tasks']) or '(none)'}; depths {meta['depths']}; {meta['samples']} sample(s) per "
        f"task, length and depth; {meta['fidelity_samples']} natural-text prompt(s) per length for fidelity; "
        f"seed {meta['seed']}.",
    ]
    if meta.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()) + "."]
    extras = [f"{c['label']}: {json.dumps(c['extra'])}" for c in meta["configs"] if c["extra"]]
    if extras:
        lines += ["", "Fixed parameters: " + "; ".join(sorted(set(extras))) + "."]
    tasks = sorted({t for r in rows for t in r["task_scores"]})
    if tasks:
        lines += ["", "### Task scores (RULER string match, x100; [95% Wilson interval]; / full: the score over "
                  f"`full`'s at the same length, left out where `full` scores below {FULL_PASSES:.0f})", "",
                  "| config | length | keep | decode share | " + " | ".join(f"{t} | / full" for t in tasks) + " | n |",
                  "|---|---:|---:|---:|" + "---:|---:|" * len(tasks) + "---:|"]
        for r in rows:
            cells = []
            for t in tasks:
                cell = r["task_cells"].get(t)
                if cell is None:     # a task this configuration has no scored sample of
                    cells += ["–", "–"]
                    continue
                interval = f" [{cell['ci'][0]:.0f}–{cell['ci'][1]:.0f}]" if cell["ci"] else ""
                cells.append(fmt(cell["mean"]) + interval)
                cells.append("full fails" if t in r["full_fails"] else fmt(r["vs_full"][t], 2))
            lines.append(f"| {r['config']} | {r['length']} | {fmt(r['nominal_fraction'], 3)} | "
                         f"{fmt(r.get('decode_attended_fraction'), 3)} | "
                         + " | ".join(cells) + f" | {r['n_task_samples']} |")
    lines += ["", "### Fidelity to full attention (natural text, 64 tokens: greedy, and teacher-forced)", "",
              "| config | length | keep | agreement | prefix | KL (nats) | forced top-1 (min) | forced KL (max) | "
              "decode ppl ratio | prompt ppl ratio | n (greedy / forced) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        top1 = fmt(r.get("forced_top1"), 3) + (f" ({r['forced_top1_min']:.3f})" if r.get("forced_top1_min") is not None
                                                else "")
        kl = fmt(r.get("forced_kl"), 4) + (f" ({r['forced_kl_max']:.4f})" if r.get("forced_kl_max") is not None
                                           else "")
        lines.append(f"| {r['config']} | {r['length']} | {fmt(r['nominal_fraction'], 3)} | "
                     f"{fmt(r['agreement'], 3)} | {fmt(r['prefix'], 3)} | {fmt(r['kl'], 4)} | {top1} | {kl} | "
                     f"{fmt(r.get('decode_ppl_ratio'), 4)} | {fmt(r.get('prompt_ppl_ratio'), 4)} | "
                     f"{r['n_text_samples']} / {r.get('n_forced_samples', 0)} |")
    lines += ["", "### Speed inside the sweep (concurrent requests; medians)", "",
              "| config | length | TTFT ms | TPOT ms | attended fraction (server) | errors |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = f"{r['errors']}" + (f" ({r['first_error'][:80]})" if r["errors"] else "")
        lines.append(f"| {r['config']} | {r['length']} | {fmt(r['ttft_ms'], 0)} | {fmt(r['tpot_ms'], 1)} | "
                     f"{fmt(r['attended_fraction'], 3)} | {err} |")
    lines += ["", "keep: the share of the context one decode step attends (nominal, from the parameters, on the "
              "layers the strategy acts on); decode share: the server's report of the decode steps' "
              "attended share, every layer counted (a model's sliding-window layers attend their window); "
              "agreement/prefix: greedy tokens equal to full's (position-wise / common prefix); KL: "
              "mean KL(full || strategy) over full's top-20 + other, on the common prefix; forced top-1 / KL: "
              "the same text's true next 64 tokens forced on both (teacher forcing), the share of the 63 "
              "decode positions where the strategy's most likely token is full's and the mean KL there "
              "(mean over texts, the worst text in brackets); decode ppl "
              "ratio: perplexity of the text's true next 64 tokens, teacher-forced, over full's, "
              "scored on the 63 tokens produced by decode steps (the first comes from the prefill); "
              "prompt ppl ratio: prompt perplexity (second half) over full's, from the prefill, "
              "measured for sparse-prefill strategies only; "
              "attended fraction: the server's report, which counts the prefill too."]
    if plots:
        lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_lines(ax, series: dict[str, list[tuple[float, float]]], style=None) -> None:
    for label, points in sorted(series.items()):
        pts = sorted(p for p in points if p[1] is not None and not math.isnan(p[1]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="--" if label.startswith(FULL) else "-")


def length_axis(ax, lengths: list[int]) -> None:
    """Prompt lengths on a log2 axis labelled with the measured lengths themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.minorticks_off()
    if len(lengths) == 1:
        ax.set_xlim(lengths[0] / 1.5, lengths[0] * 1.5)
    ax.set_xlabel("prompt tokens")


def write_plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lengths = sorted({r["length"] for r in rows})
    written = []

    # score vs budget (nominal keep fraction), one panel per length
    if any(r["score"] is not None for r in rows):
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
        for ax, length in zip(axes[0], lengths):
            series: dict[str, list] = defaultdict(list)
            full_score = None
            for r in rows:
                if r["length"] != length or r["score"] is None:
                    continue
                if control_row(r):
                    full_score = r["score"]
                elif r["strategy"] != FULL:
                    series[r["strategy"]].append((r["nominal_fraction"], r["score"]))
            plot_lines(ax, series)
            if full_score is not None:
                ax.axhline(full_score, color="black", linestyle="--", label=FULL)
            ax.set_xlim(0, 1.05)
            ax.set_xlabel("KV share attended per decode step")
            ax.set_ylabel("mean task score")
            ax.set_title(f"{length} tokens")
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "score_vs_budget.png", dpi=100)
        plt.close(fig)
        written.append("score_vs_budget.png")

    # fidelity vs length
    if any(r["agreement"] is not None for r in rows):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        agree: dict[str, list] = defaultdict(list)
        kl: dict[str, list] = defaultdict(list)
        for r in rows:
            if control_row(r):
                continue
            agree[r["config"]].append((r["length"], r["agreement"]))
            kl[r["config"]].append((r["length"], r["kl"]))
        plot_lines(axes[0], agree)
        plot_lines(axes[1], kl)
        axes[0].set_ylabel("greedy agreement with full")
        axes[0].set_ylim(-0.03, 1.03)
        axes[1].set_ylabel("KL(full || strategy), nats")
        for ax in axes:
            length_axis(ax, lengths)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fidelity_vs_length.png", dpi=100)
        plt.close(fig)
        written.append("fidelity_vs_length.png")

    # time per output token vs length
    if any(r["tpot_ms"] is not None for r in rows):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        series = defaultdict(list)
        for r in rows:
            series[r["config"]].append((r["length"], r["tpot_ms"]))
        plot_lines(ax, series)
        length_axis(ax, lengths)
        ax.set_ylabel("time per output token, ms (median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "tpot_vs_length.png", dpi=100)
        plt.close(fig)
        written.append("tpot_vs_length.png")
    return written


def write_report(result: dict, out: Path, doc: Path | None = None) -> None:
    plots = write_plots(result, out)
    (out / "results.md").write_text(markdown(result, plots))
    if doc is not None:
        rel = os.path.relpath(out.resolve(), doc.resolve().parent)
        command = result["meta"].get("command") or "attnserve eval ..."
        header = [
            f"# Evaluation results: {result['meta'].get('model') or 'the served model'}",
            "",
            "Generated by `attnserve eval` (docs/evaluation.md); do not edit by hand. Regenerate with:",
            "",
            "```sh",
            command,
            "```",
            "",
            f"Raw data: [{rel}/sweep.json]({rel}/sweep.json) (rows), [{rel}/outputs.jsonl]({rel}/outputs.jsonl) "
            "(every request with the model's output).",
            "",
        ]
        body = markdown(result, [f"{rel}/{p}" for p in plots])
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text("\n".join(header) + "\n" + body)


# -- the command ------------------------------------------------------------------------------------


# `attnserve <command>`: pyproject.toml declares this module in the attnserve.commands entry points
COMMAND_HELP = "long-context tasks and fidelity to full: a strategy x budget x length sweep"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, required=False)   # one of them unless --report-from
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help="comma-separated strategies (full is always run as the reference); "
                             "those the server marks unavailable are skipped")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="comma-separated budgets: integers are KV tokens per decode step, floats in "
                             "(0, 1] fractions of the prompt; '' runs each strategy with its defaults")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prompt lengths in tokens")
    parser.add_argument("--tasks", default=",".join(tk.TASKS),
                        help=f"comma-separated tasks ({', '.join(tk.TASKS)}); '' for fidelity only")
    parser.add_argument("--depths", default="0.5", help="needle depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=2, help="samples per task, length and depth")
    parser.add_argument("--fidelity-samples", type=int, default=2,
                        help="natural-text prompts per length for fidelity (0: none)")
    parser.add_argument("--no-ppl", dest="ppl", action="store_false",
                        help="skip the prompt-perplexity requests")
    parser.add_argument("--no-greedy-text", dest="greedy_text", action="store_false",
                        help="skip the free-running greedy continuations of the fidelity texts (agreement, "
                             "prefix, KL): the teacher-forced ones measure fidelity without early divergence")
    parser.add_argument("--no-decode-ppl", dest="decode_ppl", action="store_false",
                        help="skip the teacher-forced continuation requests (decode ppl ratio)")
    parser.add_argument("--floor", action="store_true",
                        help="run full twice (full#2): its fidelity to the first run is the floor that two runs of "
                             "the same dense attention reach in different batches (vLLM's CPU path is not "
                             "batch-invariant)")
    parser.add_argument("--ppl-all", action="store_true",
                        help="measure the prompt perplexity of dense-prefill strategies too (ratio 1 by "
                             "construction; a check)")
    parser.add_argument("--strategy-params", action="append", default=[], metavar="NAME=JSON",
                        help="fixed params of a strategy, e.g. sink='{\"n_sink\": 64}' (repeatable); "
                             "seer uses the server's gates for the model unless given")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval-results", help="output folder")
    parser.add_argument("--doc", default=None,
                        help="also write this Markdown page (title, the command, tables, plots linked "
                             "relative to it), e.g. docs/results.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--report-from", default=None, metavar="DIR",
                        help="only rebuild the tables and plots (and --doc) from a finished run's folder")


def rebuild(out: Path, doc: Path | None = None, tokenizer: str | None = None) -> dict:
    """The rows, tables and plots again from a finished run's raw data (`sweep.json`'s meta and
    `outputs.jsonl`), e.g. after the report gained a column; nothing is sent to a server."""
    result = json.loads((out / "sweep.json").read_text())
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines() if line.strip()]
    meta = result["meta"]
    configs = [Config(c["strategy"], c["budget"], tuple(sorted(c["extra"].items()))) for c in meta["configs"]]
    result["rows"] = aggregate(records, configs, meta["lengths"], model_facts(tokenizer))
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, doc)
    return result


def run(args: argparse.Namespace) -> int:
    if args.report_from:
        out = Path(args.report_from)
        rebuild(out, Path(args.doc) if args.doc else None, args.tokenizer)
        print((out / "results.md").read_text())
        return 0
    if not (args.base_url or args.start_server):
        raise SystemExit("attnserve eval: one of --base-url, --start-server (or --report-from) is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with server_from_args(args, out) as base_url:
        result = run_sweep(args, base_url)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'sweep.json'}, {out / 'outputs.jsonl'}, {out / 'results.md'} and plots",
          file=sys.stderr)
    return 1 if result["meta"]["errors"] == result["meta"]["requests"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
