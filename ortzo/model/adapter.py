"""A frozen base's trained tensors as an ONNX Runtime adapter (`.onnx_adapter`).

The serving stack loads it over the unchanged base: plain ORT through `LoraAdapter` and
`RunOptions.add_active_adapter` (each trained tensor is an overridable initializer of the
folder's graph, so the adapter's values replace the base's per request), onnxruntime-genai
through `og.Adapters`. The file records the base it was made for as its model version (the
base's id, from the graph and its frozen data), so an adapter for another base is refused by
name here rather than silently scoring wrong. Needs only onnxruntime.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import OrtzoError
from ..files import TMP_SUFFIX, check_target, fsync_dir
from .manifest import Manifest
from .weights import WeightStore

SUFFIX = ".onnx_adapter"


def base_id(manifest: Manifest, folder: str | Path) -> int:
    """The id of a folder's frozen base; a folder without one cannot take adapters."""
    if not manifest.base:
        raise OrtzoError(f"{folder} has no frozen base, so no adapter applies to it: adapters need a base exported "
                         "with --quantize or --lora (bake a run over a plain folder instead)")
    return int(manifest.base["id"])


def write_adapter(path: str | Path, manifest: Manifest, folder: str | Path, tensors: Mapping[str, np.ndarray],
                  version: int = 0) -> int:
    """Write `tensors` (trainable tensors of the folder's base) to `path` atomically; `version`
    is the adapter's own, for its user. Returns the file's size in bytes."""
    import onnxruntime as ort

    base = base_id(manifest, folder)
    _check(manifest, folder, {n: a.shape for n, a in tensors.items()}, str(path))
    path = Path(path)
    if path.suffix != SUFFIX:
        raise OrtzoError(f"--out {path}: an adapter file ends in {SUFFIX}")
    check_target(path)
    fmt = ort.AdapterFormat()
    fmt.set_model_version(base)
    fmt.set_adapter_version(int(version))
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32))
                        for n, a in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path.stat().st_size


def read_adapter(path: str | Path, manifest: Manifest, folder: str | Path) -> dict[str, np.ndarray]:
    """The adapter's tensors, checked to be for this folder's base (its id, names and shapes)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OrtzoError(f"adapter not found: {path}")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        tensors = {n: v.numpy() for n, v in fmt.get_parameters().items()}
    except Exception as e:  # ORT's own exception types for a file that is not an adapter
        raise OrtzoError(f"{path} is not an ONNX Runtime adapter: {str(e).splitlines()[0]}") from None
    if fmt.get_model_version() != base_id(manifest, folder):
        raise OrtzoError(f"{path} was made for another base (id {fmt.get_model_version()}; {folder}'s is "
                         f"{base_id(manifest, folder)})")
    _check(manifest, folder, {n: a.shape for n, a in tensors.items()}, str(path))
    return tensors


def apply_adapter(path: str | Path, store: WeightStore, folder: str | Path) -> None:
    """Set `store`'s tensors (and their fp32 masters) to the adapter's, all checked first."""
    for name, value in read_adapter(path, store.manifest, folder).items():
        store.arrays[name][...] = value
        if name in store.masters:
            store.masters[name][...] = value


def _check(manifest: Manifest, folder: str | Path, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    params = {p.name: p.shape for p in manifest.parameters}
    for name, shape in shapes.items():
        if name not in params:
            raise OrtzoError(f"{what}: {name} is not a trainable tensor of {folder}")
        if tuple(shape) != params[name]:
            raise OrtzoError(f"{what}: {name} has shape {tuple(shape)}, {folder} has {params[name]}")
    if not shapes:
        raise OrtzoError(f"{what}: no tensors")
