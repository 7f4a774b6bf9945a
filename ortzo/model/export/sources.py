"""Where a model comes from: an alias in export/, a hub id, a local Hugging Face folder, or a
GGUF file (also one shipped inside a pip package); and opening it: its config and a reader of
its tensors, so that no export ever holds the whole model."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from filelock import FileLock

from ...errors import OrtzoError
from ...files import sha256_file
from .tensors import GGUFTensors, SafetensorsFiles, Tensors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """Where a model comes from: a hub id, a local HF folder, or a GGUF file."""

    kind: str  # "hub" | "dir" | "gguf"
    location: str
    alias: str | None = None


def known_models() -> list[str]:
    return sorted(p.name[:-5] for p in files("ortzo.model_files").iterdir() if p.name.endswith(".toml"))


def resolve(model: str) -> Source:
    """An alias from export/*.toml, a .gguf path, a local folder, or else a hub id."""
    spec = files("ortzo.model_files") / f"{model}.toml"
    if spec.is_file():
        d = tomllib.loads(spec.read_text(encoding="utf-8"))["source"]
        if d["kind"] == "hub":
            return Source("hub", d["id"], model)
        if d["kind"] == "package-gguf":
            return Source("gguf", str(_packaged_gguf(d)), model)
        raise OrtzoError(f"export/{model}.toml: unknown source kind {d['kind']!r}")
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OrtzoError(f"GGUF file not found: {path}")
        return Source("gguf", str(path))
    if path.is_dir():
        return Source("dir", str(path))
    if path.exists() or not _HUB_ID.match(model):
        raise OrtzoError(f"unknown model {model!r}: not an alias ({', '.join(known_models())}), "
                         "a .gguf file, a local folder or a hub id (owner/name)")
    return Source("hub", model)


def _packaged_gguf(d: dict[str, Any]) -> Path:
    spec = importlib.util.find_spec(d["module"])
    if spec is None or not spec.submodule_search_locations:
        raise OrtzoError(f"package {d['package']} is not installed: {d['install']}")
    if "assemble" in d:
        return _assembled(d)
    path = Path(spec.submodule_search_locations[0]) / d["file"]
    if not path.is_file():
        raise OrtzoError(f"{d['package']} does not hold {d['file']}")
    return path


def _assembled(d: dict[str, Any]) -> Path:
    """A chunked package's GGUF, assembled once into the temp folder: built under a temporary
    name and renamed, so a killed assembly never leaves a partial file to be reused, and
    reused only while its sha256 matches the one the package states."""
    mod = importlib.import_module(d["module"])
    expected = getattr(mod, d["sha256_attr"]) if "sha256_attr" in d else None
    target = Path(tempfile.gettempdir()) / "ortzo-gguf" / d["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):  # two exports assemble it once
        if target.is_file() and (expected is None or sha256_file(target) == expected):
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            getattr(mod, d["assemble"])(str(tmp))
            if expected is not None and sha256_file(tmp) != expected:
                raise OrtzoError(f"{d['package']} assembled a file whose sha256 is not {expected}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target

@dataclass(frozen=True)
class Checkpoint:
    """What an export reads from a source: its config, its tensors one at a time, and the
    folder that holds its tokenizer files (None for a GGUF, which holds its own)."""

    config: Any
    tensors: Tensors
    folder: Path | None


HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def open_checkpoint(source: Source) -> Checkpoint:
    """The config and a tensor reader; no weights are read. A hub model is downloaded first
    (its safetensors, config and tokenizer files only)."""
    from transformers import AutoConfig

    try:
        if source.kind == "gguf":
            from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

            gguf = Path(source.location)
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config.architectures = config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
            return Checkpoint(config, GGUFTensors(gguf, config), None)
        folder = Path(source.location) if source.kind == "dir" else _download(source.location)
        return Checkpoint(AutoConfig.from_pretrained(folder), SafetensorsFiles(folder), folder)
    except OSError as e:
        raise OrtzoError(f"cannot load {source.location}: {str(e).splitlines()[0]}") from None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
