"""Imports run one way: server -> strategies -> ops. The evaluation and benchmarks (bench/) and the load
tests (loadtests/) are clients: the server finds their commands through entry points and imports none of
them; strategies import neither the server nor the clients; no two modules import each other; the policies
import neither their vLLM glue (strategies/engine) nor the calibration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "strategies", "bench", "loadtests")
CLIENTS = ("bench", "loadtests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, known: set[str]) -> set[str]:
    """The repo modules ``path`` imports, at any depth of the file (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                while name and name not in known:     # `from pkg import name` where name is not a module
                    name = name.rpartition(".")[0]
                if name:
                    found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imported(p, known) - {module_name(p)} for p in files}


def test_the_server_and_the_strategies_import_no_client(graph):
    wrong = sorted((m, d) for m, deps in graph.items() for d in deps
                   if m.split(".")[0] in ("server", "strategies") and d.split(".")[0] in CLIENTS)
    assert not wrong, wrong


def test_the_strategies_import_no_server_module(graph):
    wrong = sorted((m, d) for m, deps in graph.items() for d in deps
                   if m.startswith("strategies") and d.startswith("server"))
    assert not wrong, wrong


def test_no_import_cycle(graph):
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return False

    # a package's __init__ importing its own modules is not a cycle of modules
    cycles = sorted((a, b) for a, deps in graph.items() for b in deps
                    if not a.startswith(b + ".") and not b.startswith(a + ".") and reaches(b, a))
    assert not cycles, cycles


def test_the_client_and_calibration_commands_are_entry_points(graph):
    """`attnserve eval | bench | recommend` and the seer calibration's commands exist although server/
    imports neither bench/ nor strategies/calibration; calibrate-seer and seer-report get --model resolved."""
    from server.cli import build_parser

    assert not [d for d in graph["server.cli"] if d.startswith(("bench", "strategies.calibration"))]
    parser = build_parser()
    required = {"recommend": ["--results", "sweep.json", "--prompt-len", "1024"], "bench": ["--start-server"],
                "eval": ["--start-server"], "calibration-text": ["--out", "x.txt"]}
    for command in ("eval", "bench", "recommend", "calibrate-seer", "seer-report", "calibration-text"):
        args = parser.parse_args([command, *required.get(command, [])])
        assert args.command == command
        resolves_model = command in ("calibrate-seer", "seer-report")
        assert (args.run.__name__ == "wrapped") == resolves_model, command


def test_the_policies_do_not_reach_into_vllm_glue_or_calibration(graph):
    """strategies/engine (the vLLM plugin, backends, KV release) and strategies/calibration use the
    policies; the policies, their registry and the ops use neither."""
    sub_packages = ("strategies.engine", "strategies.calibration")
    wrong = sorted((m, d) for m, deps in graph.items() for d in deps
                   if m.startswith("strategies") and not m.startswith(sub_packages) and d.startswith(sub_packages))
    assert not wrong, wrong
