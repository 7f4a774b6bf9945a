"""The trainable folder's graph in ORT format, for phones: what ONNX Runtime's mobile packages
and minimal builds load.

onnxruntime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`) writes
`model.ort` and `required_operators.config` (the operator list a minimal build takes with
`--include_ops_by_config`). The weights stay graph inputs, so the file holds no weight bytes
(the flatbuffer's 2 GB limit never applies) and a session over it binds the same store. A
frozen base's quantized matrices are constants of its graph, so they go inside the file; a base
too large for a flatbuffer is refused before converting.

Optimization style Fixed, for the ARM target platform: the converter applies every
CPU-provider optimization once, here (fused norms, FusedMatMul, QuickGelu for SiLU; no NCHWc
layout, which is x86-only), so a phone's CPU provider runs the fused graph although a minimal
build has no optimizer. The Runtime style would save only the basic optimizations plus
replayable ones (QDQ fusions, none here): the CPU would run the graph unfused. ORT advises the
Runtime style for compiling providers (NNAPI, CoreML, QNN), and the Fixed graph does not suit
them: its CPU-only fused ops and dynamic-shape nodes fall back, and QNN does not start on it
(docs/placement.md). This module writes only the Fixed graph, the phone's CPU loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path

from ..errors import OrtzoError
from ..files import atomic_open
from ..output import silenced
from .manifest import Manifest

OPERATORS = "required_operators.config"
FLATBUFFER_BYTES = 2**31 - 2**24  # flatbuffers address 2 GiB; a margin for the graph's own tables


def add_ort_graph(folder: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Convert `folder`'s graph to ORT format beside it and record it in the manifest as
    `ort_graph`. The converter writes into a temporary folder; each file is then written
    atomically into `folder`, the manifest last, so an interrupted conversion never leaves a
    manifest that names a missing or half-written graph."""
    with silenced():  # its import configures the root logger (logging.basicConfig): undone
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    graph = folder / manifest.graph
    if manifest.base and manifest.base["data_bytes"] + graph.stat().st_size > FLATBUFFER_BYTES:
        raise OrtzoError(f"{folder}'s frozen base ({manifest.base['data_bytes'] / 2**30:.2f} GiB) does not fit an "
                         f"ORT-format file (a flatbuffer, under 2 GiB): phones run its model.onnx")
    ort_graph = Path(manifest.graph).with_suffix(".ort").name
    with tempfile.TemporaryDirectory() as tmp:
        said = io.StringIO()
        try:  # the converter prints and logs its progress: keep only warnings
            with contextlib.redirect_stdout(said), silenced("ort_format_model"):
                convert_onnx_models_to_ort(graph, output_dir=Path(tmp), optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="arm")
        except Exception as e:  # the converter raises whatever ORT or its flatbuffer code raised
            raise OrtzoError(f"onnxruntime's ORT-format converter failed on {graph}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else said.getvalue()[-200:]}") from None
        # one of each; their names carry the optimization level when the converter's environment
        # variable sets one (ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL)
        (made,), (config,) = Path(tmp).resolve().glob("*.ort"), Path(tmp).resolve().glob("*.config")
        with atomic_open(folder / ort_graph, "wb") as f:
            f.write(made.read_bytes())
        with atomic_open(folder / OPERATORS, "w") as f:  # its header names the model it lists: this one
            f.write(config.read_text(encoding="utf-8").replace(str(made), ort_graph))
    manifest = dataclasses.replace(manifest, ort_graph=ort_graph)
    manifest.save(folder)
    return manifest


def required_operators(folder: str | Path) -> dict[tuple[str, int], set[str]]:
    """The folder's required-operators config as {(domain, opset): op types}: its lines are
    `domain;opset;Op1,Op2,...` after `#` comments."""
    ops: dict[tuple[str, int], set[str]] = {}
    for line in (Path(folder) / OPERATORS).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, names = line.strip().split(";")
            ops.setdefault((domain, int(opset)), set()).update(names.split(","))
    return ops
