"""Task generators (deterministic, exact lengths, needles at the requested depth) and RULER scoring."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import tasks as tk


def test_string_match_all_scores_references():
    assert tk.string_match_all("The pass key is 12345.", ["12345"]) == 100.0
    assert tk.string_match_all("The pass key is 12346.", ["12345"]) == 0.0
    assert tk.string_match_all("ABCDE and fghij", ["abcde", "FGHIJ"]) == 100.0  # case-insensitive
    assert tk.string_match_all("abcde only", ["abcde", "fghij"]) == 50.0
    with pytest.raises(ValueError):
        tk.string_match_all("x", [])


@pytest.mark.parametrize("task", tk.TASKS)
def test_generation_is_deterministic(task, tokenizer):
    a = tk.generate(task, 700, tokenizer, seed=3, index=1, depth=0.4)
    b = tk.generate(task, 700, tokenizer, seed=3, index=1, depth=0.4)
    c = tk.generate(task, 700, tokenizer, seed=4, index=1, depth=0.4)
    assert a.prompt_ids == b.prompt_ids and a.references == b.references
    assert a.references != c.references and a.prompt_ids != c.prompt_ids


@pytest.mark.parametrize("task", tk.TASKS)
@pytest.mark.parametrize("length", [400, 1500])
def test_length_and_scoring(task, length, tokenizer):
    sample = tk.generate(task, length, tokenizer, seed=0, index=0, depth=0.5)
    # the longest prompt that fits: at most `length`, within a few haystack units of it
    assert length - 40 <= sample.prompt_len <= length
    text = tokenizer.decode(sample.prompt_ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant" in text
    # the reference answer scores 100, a wrong answer 0
    assert tk.score(sample, " " + ", ".join(sample.references) + ".") == 100.0
    assert tk.score(sample, " I do not know.") == 0.0
    if task != "cwe":
        for ref in sample.references:  # every answer is in the context
            assert ref in text


@pytest.mark.parametrize("task", ["passkey", "niah_single"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_at_requested_depth(task, depth, tokenizer):
    sample = tk.generate(task, 2048, tokenizer, seed=1, index=0, depth=depth)
    assert len(sample.needle_depths) == 1
    assert abs(sample.needle_depths[0] - depth) <= 0.05
    # and independently of the generator's own measurement: where the answer sits in the tokens
    text = tokenizer.decode(sample.prompt_ids)
    body_start = text.index("\n", text.index("<|im_start|>user"))
    body_end = text.rindex("<|im_end|>")
    context = text[body_start:body_end]
    position = context.index(sample.references[0]) / len(context)
    assert abs(position - depth) <= 0.12


def test_multikey_has_distractors_and_one_answer(tokenizer):
    sample = tk.generate("niah_multikey", 1500, tokenizer, seed=2, depth=0.3)
    text = tokenizer.decode(sample.prompt_ids)
    assert text.count("One of the special magic numbers for") == 4
    assert len(sample.references) == 1
    assert abs(sample.needle_depths[0] - 0.3) <= 0.1


def test_vt_chain_in_order(tokenizer):
    sample = tk.generate("vt", 1500, tokenizer, seed=5, depth=0.2)
    text = tokenizer.decode(sample.prompt_ids)
    names = sample.references
    positions = [text.index(f"VAR {n} =") for n in names]
    assert positions == sorted(positions)
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in text


def test_cwe_common_words_are_most_common(tokenizer):
    sample = tk.generate("cwe", 1500, tokenizer, seed=0)
    text = tokenizer.decode(sample.prompt_ids)
    body = text[text.index("appear most often.\n"):text.index("\nQuestion:")]
    counts = Counter(line.split(". ", 1)[1] for line in body.splitlines()[1:] if ". " in line)
    top = {w for w, _ in counts.most_common(len(sample.references))}
    assert top == set(sample.references)
    assert min(counts[w] for w in sample.references) > max(
        c for w, c in counts.items() if w not in sample.references)
