"""The full-logits graph: a trainable folder's graph without its scoring head, ending in the
standard `logits` output [batch, seq, vocab], for text generation.

Its weight inputs are the trainable graph's own (names, shapes, dtypes, an fp16 folder's casts),
so a second session binds the same weight arrays zero-copy and generates with the weights
being fine-tuned; `ortzo bake` makes a standalone model of it. Needs onnx (the `onnx` extra).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OrtzoError
from ..files import atomic_open
from .export.head import FLAT_SHAPE, INPUTS, NODES, TAIL, LmHead, lm_head
from .manifest import Manifest

if TYPE_CHECKING:
    import onnx

LOGITS = "logits.onnx"
OUTPUT = "logits"
IDS = "input_ids"  # its shape is the batch's [batch, seq]


def logits_graph(folder: str | Path) -> onnx.ModelProto:
    """The folder's trainable graph with `logits` = (final hidden state) @ (lm-head weight) in
    place of the scoring head. The rows are projected by the head's own node (Gemm with
    transB for a tied embedding), so each row's logits are those the head scores."""
    import onnx
    from onnx import TensorProto, helper

    path = Path(folder) / Manifest.load(folder).graph
    model = onnx.load(str(path), load_external_data=False)  # a frozen base's data stays where it is
    g = model.graph
    try:
        head = lm_head(g)
    except OrtzoError as e:
        raise OrtzoError(f"{path}: {e}") from None
    vocab = _vocab(g, head)
    _keep(g.node, lambda n: n.name not in NODES and not n.name.startswith(TAIL))
    _keep(g.input, lambda i: i.name not in INPUTS)
    _keep(g.initializer, lambda i: i.name != FLAT_SHAPE)
    g.initializer.extend([helper.make_tensor("logits/flat_shape", TensorProto.INT64, [2], [-1, head.hidden_size]),
                          helper.make_tensor("logits/vocab", TensorProto.INT64, [1], [vocab])])
    g.node.extend([
        helper.make_node("Reshape", [head.hidden, "logits/flat_shape"], ["logits/flat_hidden"], name="logits/flatten"),
        *head.project("logits/flat_hidden", "logits/flat_logits", "logits/lm_head"),
        helper.make_node("Shape", [IDS], ["logits/batch_seq"], name="logits/batch_seq"),
        helper.make_node("Concat", ["logits/batch_seq", "logits/vocab"], ["logits/shape"], axis=0, name="logits/shape"),
        helper.make_node("Reshape", ["logits/flat_logits", "logits/shape"], [OUTPUT], name="logits/unflatten"),
    ])
    ids = next(i for i in g.input if i.name == IDS).type.tensor_type.shape.dim
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT,
                                                  [d.dim_param or d.dim_value for d in ids] + [vocab]))
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
        onnx.checker.check_model(model)  # (a frozen base's graph was checked by path when written)
    return model


def write_logits_graph(folder: str | Path) -> Manifest:
    """Write the folder's full-logits graph (weight-free, like its trainable graph) as
    `logits.onnx` and record it in the manifest; returns the updated manifest."""
    folder = Path(folder)
    model = logits_graph(folder)
    with atomic_open(folder / LOGITS, "wb") as f:
        f.write(model.SerializeToString())
    manifest = replace(Manifest.load(folder), logits_graph=LOGITS)
    manifest.save(folder)
    return manifest


def _vocab(g, head: LmHead) -> int:
    """The vocabulary size: a quantized head's N, or from the shape of the weight the head
    reads (through its fp32 cast in an fp16 folder), a graph input or a frozen initializer."""
    from onnx import helper

    if head.node.op_type == "MatMulNBits":
        return next(helper.get_attribute_value(a) for a in head.node.attribute if a.name == "N")
    casts = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Cast"}
    name = casts.get(head.node.input[1], head.node.input[1])
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    dims = inputs.get(name) or next(list(t.dims) for t in g.initializer if t.name == name)
    return dims[0 if head.node.op_type == "Gemm" else 1]


def _keep(items: Any, keep: Callable[[Any], bool]) -> None:
    """Filter a repeated protobuf field in place."""
    kept = [x for x in items if keep(x)]
    del items[:]
    items.extend(kept)
