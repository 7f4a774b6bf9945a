"""The ortzo pass over a weight-free Optimum export (trace.trace_graph): every weight a graph
input under its PyTorch name, tied weights one buffer, Linear weights stored pre-transposed,
the weights streamed from the source files into one aligned flat file, the scoring head added.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import OrtzoError
from ...files import atomic_open, write_json
from ..manifest import HF_CONFIG, Manifest, Parameter
from .flatfile import FlatWriter
from .head import INPUTS as HEAD_INPUTS
from .head import OUTPUT, add_scoring_head
from .names import TorchParameters, torch_parameters
from .tensors import Tensors
from .trace import GRAPH

WEIGHTS = "weights.bin"
JOURNAL = "weights.journal"
DATA_INPUTS = ("input_ids", "attention_mask", "position_ids", *HEAD_INPUTS)


def convert(onnx_path: Path, config: Any, tensors: Tensors, out: Path, tokenizer: dict[str, Any],
            source: dict[str, Any], dtype: str = "float32",
            progress: Callable[[Iterable[Any], int], Iterable[Any]] = lambda it, n: it) -> Manifest:
    """Writes model.onnx, weights.bin, manifest.json and the model's Hugging Face config
    (HF_CONFIG) into `out`. The weights come from `tensors` one at a time; a weight file left
    half written by a killed export in `out` is resumed (flatfile).

    dtype "float16" stores the weights in fp16 (half the file); the graph casts each to fp32
    where it is used, so compute stays fp32 on every provider (on CPU the casts cost more
    memory than fp16 saves: the README has the figures)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    torch_params = torch_parameters(config)
    names = _parameter_inputs(g, torch_params)
    kept = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(kept)
    rename_inputs(g, names)  # a tied weight traced under both its names becomes one input
    order = list(dict.fromkeys(names.values()))
    transposed = _fold_transposes(g, order, torch_params)
    params, sha256, size = _stream_weights(tensors, order, torch_params, out, dtype, transposed, progress)
    declare_inputs(g, params)
    add_scoring_head(g)
    _prune(g)
    if dtype == "float16":
        _cast_weights(g, [p.name for p in params])
    onnx.checker.check_model(model)
    with atomic_open(out / GRAPH, "wb") as fo:
        fo.write(model.SerializeToString())
    hf_config = json.loads(config.to_json_string(use_diff=False))  # every default explicit: tie_word_embeddings
    hf_config.pop("_name_or_path", None)  # the folder it was read from
    hf_config["dtype"] = "float32"  # what the folder's weights are to PyTorch (fp16 ones are stored, not computed)
    write_json(out / HF_CONFIG, hf_config)
    inputs = tuple(i.name for i in g.input if i.name in DATA_INPUTS)
    manifest = Manifest(graph=GRAPH, weights=WEIGHTS, weights_sha256=sha256, weights_bytes=size,
                        parameters=tuple(params), inputs=inputs, outputs=(OUTPUT,), tokenizer=tokenizer,
                        tied=torch_params.tied, source=source | {"architecture": (config.architectures or ["?"])[0]})
    manifest.save(out)
    return manifest


def rename_inputs(g, names: dict[str, str]) -> None:
    """Every node input named in `names` (old name -> new) renamed."""
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]


def declare_inputs(g, params: list[Parameter]) -> None:
    """The weights `params` declared as graph inputs, by name, dtype and shape."""
    from onnx import helper

    for p in params:
        g.input.append(helper.make_tensor_value_info(p.name, helper.np_dtype_to_tensor_dtype(np.dtype(p.dtype)),
                                                     list(p.shape)))


def _stream_weights(tensors: Tensors, order: list[str], torch_params: TorchParameters, out: Path, dtype: str,
                    transposed: set[str], progress: Callable[[Iterable[Any], int], Iterable[Any]],
                    ) -> tuple[list[Parameter], str, int]:
    """Each parameter of `order` read from `tensors` (under any of its names), checked
    against PyTorch's shape and appended to the weight file."""
    available = set(tensors.names())
    aliases: dict[str, list[str]] = {}
    for other, first in torch_params.tied.items():
        aliases.setdefault(first, []).append(other)
    writer = FlatWriter(out / WEIGHTS, out / JOURNAL)
    todo = [name for name in order if name not in writer.written]
    for name in progress(todo, len(todo)):
        stored = next((n for n in (name, *aliases.get(name, [])) if n in available), None)
        if stored is None:
            raise OrtzoError(f"the checkpoint holds no tensor {name}")
        arr = tensors.read(stored)
        if tuple(arr.shape) != torch_params.shapes[name]:
            raise OrtzoError(f"{stored} has shape {tuple(arr.shape)} in the checkpoint but "
                             f"{torch_params.shapes[name]} in PyTorch")
        writer.add(name, arr, dtype, name in transposed)
        del arr
    sha256 = writer.close()
    return [writer.written[name] for name in order], sha256, writer.size


def _parameter_inputs(g, torch_params: TorchParameters) -> dict[str, str]:
    """Graph input name -> PyTorch name, for every parameter of the model.

    The trace keeps each parameter one input named after it (a tied one under either of its
    names), so names are looked up, never inferred from node scopes, which some families skip
    (OPT's scopes lack `model.`)."""
    names = {}
    for i in g.input:
        name = torch_params.canonical(i.name)
        if name is None:
            if i.name not in DATA_INPUTS:
                raise OrtzoError(f"the traced graph has an input {i.name} that is no parameter")
            continue
        shape = tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
        if shape != torch_params.shapes[name]:
            raise OrtzoError(f"{i.name} has shape {shape} in the graph but {torch_params.shapes[name]} in PyTorch")
        names[i.name] = name
    missing = sorted(set(torch_params.shapes) - set(names.values()))
    if missing:
        raise OrtzoError(f"the graph has no input for {len(missing)} PyTorch parameters (e.g. {missing[0]}): "
                         "unused by text generation")
    return names


def _fold_transposes(g, names: list[str], torch_params: TorchParameters) -> set[str]:
    """Parameters used only through 2-D Transposes (Linear weights: MatMul(x, Transpose(W))): their
    consumers now read them directly, and they are to be stored transposed ([in, out]).

    Weights are graph inputs, which ORT cannot constant-fold: left in place, each Transpose would
    run at every step. A parameter with other uses (a tied embedding, also Gathered) keeps its
    layout; the scoring head reads its Transpose as a Gemm with transB."""
    matrices = {name for name in names if len(torch_params.shapes[name]) == 2}
    uses: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            if name in matrices:
                uses.setdefault(name, []).append(node)
    replaced: dict[str, str] = {}  # Transpose output -> the parameter it transposes
    for name, nodes in uses.items():
        if all(n.op_type == "Transpose" and _perm(n) in (None, [1, 0]) for n in nodes):
            replaced.update((n.output[0], name) for n in nodes)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in replaced:
                node.input[i] = replaced[name]
    return set(replaced.values())


def _perm(node) -> list[int] | None:
    """A Transpose's perm; None (reverse the axes) where it has none."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _cast_weights(g, names: list[str]) -> None:
    """Make weight inputs fp16, each cast to fp32 just before its first use, so that ORT need
    not hold every fp32 copy at once."""
    from onnx import TensorProto, helper

    for i in g.input:
        if i.name in names:
            i.type.tensor_type.elem_type = TensorProto.FLOAT16
    pending, nodes = set(names), []
    for node in g.node:
        for j, name in enumerate(node.input):
            if name in names:
                if name in pending:
                    nodes.append(helper.make_node("Cast", [name], [f"{name}/fp32"], to=TensorProto.FLOAT,
                                                  name=f"ortzo/cast/{name}"))
                    pending.discard(name)
                node.input[j] = f"{name}/fp32"
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)


def _prune(g) -> None:
    """Drop nodes no output depends on (the old lm_head Transpose), then unused initializers."""
    by_output = {o: n for n in g.node for o in n.output}
    needed, stack, live = set(), [o.name for o in g.output], set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        n = by_output.get(t)
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(i for i in n.input if i)
            for attr in n.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in list(attr.g.node if attr.g.node else []) + [x for gr in attr.graphs for x in gr.node]:
                    stack.extend(i for i in sub.input if i)
    kept = [n for n in g.node if id(n) in live]
    del g.node[:]
    g.node.extend(kept)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
