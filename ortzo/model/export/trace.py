"""Optimum's export of the graph: text-generation, no KV cache, with `position_ids` always
among the inputs (left-padded batches need explicit positions), and no constant folding.

Unfolded, every parameter stays one initializer under its PyTorch name, in PyTorch's layout,
for every family. Folding would rename each Linear weight to a pre-transposed `onnx::MatMul_N`
copy, store a tied embedding twice, and bake Gemma's `1 + weight` norms into new constants
that are no parameter at all; the ortzo pass (convert) folds the transposes itself."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import OrtzoError

GRAPH = "model.onnx"


def optimum_export(hf_dir: Path, out: Path, opset: int) -> Path:
    from optimum.exporters.onnx import main_export

    main_export(str(hf_dir), output=str(out), task="text-generation", opset=opset, device="cpu",
                custom_onnx_configs=_with_position_ids(hf_dir), do_constant_folding=False)
    if not (out / GRAPH).is_file():
        raise OrtzoError(f"Optimum wrote no {GRAPH} for {hf_dir}")
    return out / GRAPH


def _with_position_ids(hf_dir: Path) -> dict[str, Any] | None:
    """Optimum's config for the architecture, with a `position_ids` input if it lacks one.

    Left-padded batches need explicit positions; Optimum's Gemma 3 config, for one, has none and
    the graph would number padded rows from their padding."""
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    ctor = TasksManager.get_exporter_config_constructor("onnx", task="text-generation", model_type=config.model_type,
                                                        library_name="transformers")
    onnx_config = ctor(config, task="text-generation")
    if "position_ids" in onnx_config.inputs:
        return None

    class WithPositionIds(type(onnx_config)):
        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return super().inputs | {"position_ids": {0: "batch_size", 1: "sequence_length"}}

    return {"model": WithPositionIds(config, task="text-generation", use_past=False, use_past_in_inputs=False)}

