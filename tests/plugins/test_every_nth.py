"""A strategy from another package: tests/plugins/every_nth, installed with pip into its own folder, declares
an ``attnserve.strategies`` entry point and is served like a built-in strategy without an edit to this
repository. It is the recipe of docs/adding-a-strategy.md, whose code blocks are its files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(__file__).resolve().parent / "every_nth"
RECIPE = REPO_ROOT / "docs" / "adding-a-strategy.md"
NEAR_TIE_NATS = 0.15        # as tests/e2e: two kernels computing the same attention differ by float rounding

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """The package installed by pip (a real wheel build and its entry-point metadata) into a folder that
    goes on PYTHONPATH: nothing is installed into the environment the other tests use."""
    target = tmp_path_factory.mktemp("every-nth-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(PACKAGE)], check=True, cwd=tmp_path_factory.getbasetemp())
    return os.pathsep.join([str(target), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def python_with_plugin(plugin_path: str, code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": plugin_path},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_recipe_is_the_package():
    """docs/adding-a-strategy.md shows the package's files whole: the recipe is what these tests run."""
    blocks = dict(re.findall(r"```\w+\n# (\S+)\n(.*?)```", RECIPE.read_text(), flags=re.S))
    for name in ("pyproject.toml", "attnserve_every_nth.py"):
        assert blocks.get(f"every_nth/{name}") == (PACKAGE / name).read_text(), f"{RECIPE.name} vs {name}"


def test_the_entry_point_registers_it_after_the_builtins(plugin_path):
    out = python_with_plugin(plugin_path, (
        "from strategies import registry\n"
        "print(registry.names())\n"
        "choice = registry.parse_attention({'strategy': 'every_nth', 'budget': 0.25})\n"
        "print(choice.strategy, choice.budget)\n"
        "try:\n"
        "    registry.parse_attention({'strategy': 'every_nth', 'params': {'stride': 0}})\n"
        "except registry.ParamError as error:\n"
        "    print(error.field, '|', error.message)\n"))
    names, choice, error = out.splitlines()
    assert names == str(["full", "sink", "recycled", "landmark", "seer", "every_nth"])
    assert choice == "every_nth 0.25"
    assert error.startswith("attention.params.stride | out of range") and "[1.0, 1048576]" in error


def test_a_broken_or_clashing_entry_point_is_left_out(plugin_path, tmp_path):
    """A plugin that fails to import, or takes a built-in's name, is logged; the others still load."""
    dist = tmp_path / "broken_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[attnserve.strategies]\nmissing = no_such_module:Strategy\n"
                                           "clash = clashing_sink:Sink\n")
    (tmp_path / "clashing_sink.py").write_text(
        "from strategies.sink import SinkStrategy\n"
        "class Sink(SinkStrategy):\n    pass\n")
    code = ("import logging; logging.basicConfig(level=logging.ERROR)\n"
            "from strategies import registry\nprint(registry.names())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{plugin_path}"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(["full", "sink", "recycled", "landmark", "seer", "every_nth"])
    assert "'missing' (no_such_module:Strategy) not loaded: ModuleNotFoundError" in done.stderr
    assert "'clash' (clashing_sink:Sink) not loaded: ValueError: strategy name 'sink' is already registered" \
        in done.stderr


def test_the_registry_matrix_runs_it(plugin_path):
    """The tests every built-in strategy passes (mixed batch in fp32 and bf16, release, the decode share
    its kernels attend vs its budget) pass for the plugin, selected by name from the same matrix."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "every_nth",
                           "tests/strategies/test_strategies.py::test_matrix_mixed_batch",
                           "tests/strategies/test_budget.py::test_the_decode_share_meets_the_budget"],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": plugin_path},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    assert re.search(r"\b6 passed\b", done.stdout), done.stdout[-2000:]


def chosen_and_top(choice: dict) -> tuple[list[str], list[dict]]:
    logprobs = choice["logprobs"]
    return logprobs["tokens"], logprobs["top_logprobs"]


def assert_follows(tokens: list[str], reference: dict) -> None:
    """``tokens`` are ``reference``'s greedy tokens, or the same up to a near tie of ``reference``'s top two."""
    ref_tokens, ref_top = chosen_and_top(reference)
    for i, (token, ref_token) in enumerate(zip(tokens, ref_tokens)):
        if token != ref_token:
            top = sorted(ref_top[i].values(), reverse=True)
            assert len(top) > 1 and top[0] - top[1] <= NEAR_TIE_NATS, (i, tokens, ref_tokens, ref_top[i])
            return


def test_served_like_a_builtin(plugin_path, launch_attnserve):
    """Listed with its schema, validated with a 400 naming the field, chosen per request next to ``full``,
    its budget mapped and reported, and at stride 1 (every block) the tokens of ``full``."""
    prompt = " ".join(f"Line {i}: the grass is green and the sky is blue." for i in range(60))
    with launch_attnserve([], env={"PYTHONPATH": plugin_path}) as server, \
            httpx.Client(base_url=server.base_url, timeout=300.0) as http:
        listed = {s["name"]: s for s in http.get("/v1/strategies").json()["data"]}
        assert listed["every_nth"]["available"] and listed["every_nth"]["unsupported_reasons"] == []
        assert [p["name"] for p in listed["every_nth"]["params"]] == ["stride", "block_size"]

        def complete(attention: dict, **extra) -> httpx.Response:
            return http.post("/v1/completions", json={"model": server.model, "prompt": prompt, "max_tokens": 17,
                                                      "temperature": 0.0, "ignore_eos": True,
                                                      "attention": attention, **extra})

        bad = complete({"strategy": "every_nth", "params": {"block_size": 0}})
        assert bad.status_code == 400, bad.text
        assert "attention.params.block_size" in bad.text and "[1, 4096]" in bad.text

        budget = complete({"strategy": "every_nth", "budget": 0.25})
        assert budget.status_code == 200, budget.text
        report = budget.json()["attention"]
        assert report["strategy"] == "every_nth" and report["budget"] == 0.25
        assert 0.25 / 2 <= report["decode_attended_fraction"] <= 0.25 + 1 / 64, report

        full = complete({"strategy": "full"}, logprobs=2)
        every_block = complete({"strategy": "every_nth", "params": {"stride": 1}}, logprobs=1)
        assert full.status_code == every_block.status_code == 200, (full.text, every_block.text)
        assert every_block.json()["attention"]["decode_attended_fraction"] == pytest.approx(1.0)
        assert_follows(chosen_and_top(every_block.json()["choices"][0])[0], full.json()["choices"][0])
