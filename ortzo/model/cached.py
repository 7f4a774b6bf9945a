"""The KV-cache graph of an exported folder's causal LM, for `ortzo bake`: Optimum's
`text-generation-with-past` export of the folder's architecture (inputs `past_key_values.N.key`
and `.value`, outputs `logits` and `present.N.key` and `.value`), which Optimum's
`ORTModelForCausalLM.from_pretrained(out)` loads with its default `use_cache=True` and
generates with, one new token per step.

The trainable graph has no cache (training scores whole sequences), so the graph is traced
again, as `ortzo export` traces it: on placeholder weights (export/trace.py), each weight a
graph input under its PyTorch name, none stored; the caller makes the inputs initializers
holding the folder's weights. Transposes that only feed a Linear weight to its MatMul are
folded as the export folds them, so such weights are read in the folder's own [in, out] layout.
Needs the export extra (torch, optimum-onnx, transformers): ImportError without it.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OrtzoError
from .manifest import Manifest

if TYPE_CHECKING:
    import onnx

TASK = "text-generation-with-past"
PAST, PRESENT = "past_key_values.", "present."
DATA = ("input_ids", "attention_mask", "position_ids")


def cached_graph(folder: Path, manifest: Manifest, config: dict[str, Any]) -> tuple[onnx.ModelProto, set[str]]:
    """The with-past graph of the causal LM `config` describes (the folder's Hugging Face config),
    traced at the opset of the folder's graph, with the weights of `manifest` as inputs (fp16
    ones cast to fp32 where they are read, as in the folder's graph); and the names of the
    weights it reads [in, out] (the rest in PyTorch's layout)."""
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoConfig

    from .export import _quiet
    from .export.convert import _cast_weights, _fold_transposes, rename_inputs
    from .export.names import torch_parameters
    from .export.trace import GRAPH, _store_buffers, _weights_as_inputs, placeholder_model

    opset = next(o.version for o in onnx.load(str(folder / manifest.graph), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    hf = AutoConfig.for_model(**config)
    with tempfile.TemporaryDirectory(prefix="ortzo-bake-") as tmp, _quiet():
        model = placeholder_model(copy.deepcopy(hf))
        with _weights_as_inputs():
            onnx_export_from_model(model, tmp, task=TASK, opset=opset, device="cpu", do_constant_folding=False,
                                   do_validation=False, no_post_process=True)
        if not (Path(tmp) / GRAPH).is_file():
            raise OrtzoError(f"Optimum wrote no {GRAPH} with a KV cache for {hf.model_type}")
        _store_buffers(Path(tmp) / GRAPH, {name: b.numpy() for name, b in model.named_buffers()})
        graph = onnx.load(str(Path(tmp) / GRAPH))
        params = torch_parameters(hf)
    g = graph.graph
    names = {}
    for i in g.input:
        name = params.canonical(i.name)
        if name is not None:
            names[i.name] = name
        elif i.name not in DATA and not i.name.startswith(PAST):
            raise OrtzoError(f"the KV-cache graph has an input {i.name} that is no parameter")
    weights = {p.name: p for p in manifest.parameters}
    if set(names.values()) != weights.keys():
        odd = sorted(set(names.values()) ^ weights.keys())
        raise OrtzoError(f"the KV-cache graph's weights are not the folder's (e.g. {odd[0]}): "
                         "the folder's hf_config.json is not its model's")
    kept = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(kept)
    rename_inputs(g, names)
    order = list(dict.fromkeys(names.values()))
    transposed = _fold_transposes(g, order, params)
    _declare(g, [weights[n] for n in order], transposed)
    fp16 = [n for n in order if weights[n].dtype == "float16"]
    if fp16:
        _cast_weights(g, fp16)
    return graph, transposed


def _declare(g, params: list[Any], transposed: set[str]) -> None:
    """Each weight a graph input of its dtype, shaped as the graph reads it."""
    import numpy as np
    from onnx import helper

    for p in params:
        torch_shape = p.shape[::-1] if p.transposed else p.shape
        shape = torch_shape[::-1] if p.name in transposed else torch_shape
        g.input.append(helper.make_tensor_value_info(p.name, helper.np_dtype_to_tensor_dtype(np.dtype(p.dtype)),
                                                     list(shape)))
