"""Optimum's export of the graph, traced without the weights: text-generation, no KV cache,
`position_ids` always among the inputs (left-padded batches need explicit positions), no
constant folding, and every parameter a graph input under its PyTorch name.

The model is built from its config with placeholder parameters: each a zero-stride view of
its own 0-d tensor (a few bytes, whatever its shape), so tracing a 7B model holds no weights.
The forward really runs on them (measured: ~0.1 GB for Gemma 3 270M's, no dense copy of the
weights), so the graph is exactly the one a traced real model gives: the weights do not
steer control flow in these families. The exporter is told not to store the
parameters and to keep them as inputs, which also skips its merging of equal initializers
(it would merge placeholders of equal value). Unfolded, Gemma's `1 + weight` norms and tied
embeddings stay as PyTorch has them; the ortzo pass (convert) folds the transposes itself.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...errors import OrtzoError

GRAPH = "model.onnx"


def trace_graph(config: Any, out: Path, opset: int) -> Path:
    """Export the causal LM `config` describes (AutoModelForCausalLM, fp32) to `out`/model.onnx,
    its parameters graph inputs, none stored."""
    from optimum.exporters.onnx import onnx_export_from_model

    model = placeholder_model(copy.deepcopy(config))  # the export sets use_cache=False on what it is given
    with _weights_as_inputs():
        onnx_export_from_model(model, str(out), task="text-generation", opset=opset, device="cpu",
                               custom_onnx_configs=_with_position_ids(config), do_constant_folding=False,
                               do_validation=False, no_post_process=True)
    if not (out / GRAPH).is_file():
        raise OrtzoError(f"Optimum wrote no {GRAPH} for {config.model_type}")
    _store_buffers(out / GRAPH, {name: b.numpy() for name, b in model.named_buffers()})
    return out / GRAPH


def _store_buffers(path: Path, buffers: dict[str, Any]) -> None:
    """Persistent buffers (a causal-mask table, say) are traced as inputs like the parameters;
    their values are the config's, not the checkpoint's, so they go back into the graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    found = [i for i in g.input if i.name in buffers]
    if not found:
        return
    for i in found:
        g.input.remove(i)
        g.initializer.append(numpy_helper.from_array(buffers[i.name], i.name))
    onnx.save(model, str(path))


def placeholder_model(config: Any):  # -> transformers.PreTrainedModel
    """The model, eval mode, its parameters zero-stride placeholders (tied ones stay one object);
    buffers (rotary frequencies, embedding scales) are real, computed from the config."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:  # its own 0-d storage: the exporter dedups by data pointer
                made[id(p)] = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(p.shape),
                                                 requires_grad=False)
            module._parameters[name] = made[id(p)]
    return model.eval()


@contextmanager
def _weights_as_inputs() -> Iterator[None]:
    """Make Optimum's `torch.onnx.export` keep the parameters as inputs and store none (Optimum
    imports it inside its export function, so the patch reaches it), and hide their values
    from the exporter's passes: its shape inference copies each parameter it is given into a
    dense tensor per node that reads it (three of the largest matrix at once: 2 GB for Gemma 3's
    262k x 640 embedding); the graph's inputs already carry every shape it needs."""
    import torch.onnx
    from torch.onnx._internal.torchscript_exporter import utils

    real, named = torch.onnx.export, utils._get_named_param_dict

    def export(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **(kwargs | {"export_params": False, "keep_initializers_as_inputs": True}))

    torch.onnx.export, utils._get_named_param_dict = export, lambda graph, params: {}
    try:
        yield
    finally:
        torch.onnx.export, utils._get_named_param_dict = real, named


def _with_position_ids(config: Any) -> dict[str, Any] | None:
    """Optimum's config for the architecture, with a `position_ids` input if it lacks one.

    Left-padded batches need explicit positions; Optimum's Gemma 3 config, for one, has none and
    the graph would number padded rows from their padding."""
    from optimum.exporters.tasks import TasksManager

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
