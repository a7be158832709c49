"""Teacher-forced fidelity of an eval run split by what the forced text asks of the model: texts whose
continuation is mostly *copyable* (at least ``--copy-share`` of its 8-token windows occur verbatim in
the prompt: the corpus of licenses repeats whole passages) against *prose* (the rest). A strategy that
keeps prose but loses copies does not follow the copy source from step to step.

    .venv/bin/python -m bench.copy_split docs/results-gemma3-fidelity --model gemma3-270m

Reads the run's outputs.jsonl and sweep.json (for the seed) and rebuilds each text from the offline
corpus (``bench.fidelity.text_sample``); prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from bench import fidelity as fid
from bench.client import load_tokenizer
from server.model import resolve_model

NGRAM = 8


def copy_share(prompt: list[int], continuation: list[int], n: int = NGRAM) -> float:
    """The share of the continuation's n-token windows that occur verbatim in the prompt."""
    windows = len(continuation) - n + 1
    if windows <= 0:
        return 0.0
    seen = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    return sum(tuple(continuation[i:i + n]) in seen for i in range(windows)) / windows


def summary(values: list[tuple[float, float]]) -> str:
    if not values:
        return "0"
    top1 = [t for t, _ in values]
    kl = [k for _, k in values]
    return f"{len(values)}, {statistics.mean(top1):.3f} ({min(top1):.3f}), {statistics.mean(kl):.3f} ({max(kl):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an eval --out folder (outputs.jsonl, sweep.json)")
    parser.add_argument("--model", default=None,
                        help="the run's model: a known name or a folder (default: the embedded model), "
                             "found in $ATTNSERVE_CACHE")
    parser.add_argument("--copy-share", type=float, default=0.1, help="a text is a copy from this share on")
    args = parser.parse_args(argv)

    seed = json.loads((args.run / "sweep.json").read_text())["meta"]["seed"]
    tokenizer = load_tokenizer(resolve_model(args.model))
    records = [json.loads(line) for line in (args.run / "outputs.jsonl").read_text().splitlines()]
    forced = [r for r in records if r["kind"] == "forced" and r.get("ok") and r.get("forced_top1") is not None]
    kind_of: dict[tuple[int, str], str] = {}
    cells: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for record in forced:
        key = (record["length"], record["sample_id"])
        if key not in kind_of:
            index = int(record["sample_id"].rsplit("-", 1)[1])
            sample = fid.text_sample(record["length"], tokenizer, seed, index)
            share = copy_share(sample.prompt_ids, sample.continuation_ids)
            kind_of[key] = "copy" if share >= args.copy_share else "prose"
        cells[(record["config"], record["length"], kind_of[key])].append((record["forced_top1"], record["forced_kl"]))

    print(f"copy texts (>= {args.copy_share:g} of the continuation's {NGRAM}-grams in the prompt) per length: "
          + ", ".join(f"{length}: {sum(1 for (L, _), k in kind_of.items() if L == length and k == 'copy')} of "
                      f"{sum(1 for L, _ in kind_of if L == length)}" for length in sorted({L for L, _ in kind_of})))
    print()
    print("| config | length | prose: n, forced top-1 (min), KL (max) | copy: n, forced top-1 (min), KL (max) |")
    print("|---|---:|---|---|")
    for config, length in sorted({(c, L) for c, L, _ in cells}):
        print(f"| {config} | {length} | {summary(cells.get((config, length, 'prose'), []))} | "
              f"{summary(cells.get((config, length, 'copy'), []))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
