"""The calibration text: offline, deterministic, with a disjoint held-out part."""

from __future__ import annotations

import hashlib

from strategies.calibration import train as sc


def _write_docs(root, names_texts):
    for name, text in names_texts:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_builder_is_deterministic_and_filters(tmp_path):
    prose = "The quick brown fox jumps over the lazy dog while the licence grants permission. " * 40
    other = "Permission is hereby granted, free of charge, to any person obtaining a copy of this. " * 40
    numbers = "1 2 3 4 5 6 7 8 9 0 " * 300
    _write_docs(tmp_path / "a", [("z.md", prose), ("b/c.txt", other), ("nums.txt", numbers),
                                 ("dup.rst", prose), ("code.py", prose + "x")])
    sources = [("a", tmp_path / "a", sc.TEXT_SUFFIXES), ("missing", tmp_path / "nope", ("",))]
    first = sc.calibration_documents(sources)
    second = sc.calibration_documents(sources)
    assert first == second
    # sorted relative paths, numbers and the duplicate dropped, only the listed suffixes
    assert [n for n, _ in first] == ["a/b/c.txt", "a/dup.rst"]


def test_default_text_is_deterministic_with_heldout_part(docs, tmp_path):
    assert len(docs) >= 20
    again = sc.calibration_documents()
    assert again == docs
    train, held = sc.calibration_text("train", docs), sc.calibration_text("eval", docs)
    assert len(train) > 500_000 and len(held) > 50_000
    held_docs = [t for _, t in docs if sc.is_eval_document(t)]
    assert held_docs and all(t not in train for t in held_docs[:5])
    out, eval_out, info = sc.write_calibration_text(tmp_path / "calib.txt", docs)
    assert eval_out.name == "calib.eval.txt"
    assert out.read_text() == train and eval_out.read_text() == held
    assert info["train"]["sha256"] == hashlib.sha256(train.encode()).hexdigest()
