"""The ortzo pass over an Optimum export: every weight under its PyTorch name, tied weights
one buffer, the weights moved out of the graph into named inputs and one aligned flat file
(streamed one tensor at a time: no 2 GB protobuf limit, low memory), the scoring head added.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

import numpy as np

from ...errors import OrtzoError
from ...files import atomic_open, write_json
from ..manifest import HF_CONFIG, Manifest, Parameter, aligned
from .head import INPUTS as HEAD_INPUTS
from .head import OUTPUT, add_scoring_head
from .names import TorchParameters, torch_parameters
from .trace import GRAPH

WEIGHTS = "weights.bin"
DATA_INPUTS = ("input_ids", "attention_mask", "position_ids", *HEAD_INPUTS)
BLOCK_BYTES = 1 << 24


def convert(onnx_path: Path, hf_dir: Path, out: Path, tokenizer: dict[str, Any],
            source: dict[str, Any], dtype: str = "float32") -> Manifest:
    """The ortzo pass over an unfolded Optimum export (trace.optimum_export). Writes model.onnx,
    weights.bin, manifest.json and the model's Hugging Face config (HF_CONFIG).

    dtype "float16" stores the weights in fp16 (half the file); the graph casts each to fp32
    where it is used, so compute stays fp32 on every provider (on CPU the casts cost more
    memory than fp16 saves: the README has the figures)."""
    import onnx
    from transformers import AutoConfig

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    config = AutoConfig.from_pretrained(hf_dir)
    torch_params = torch_parameters(config)
    names = _parameter_initializers(g, torch_params)
    transposed = _fold_transposes(g, names)

    params, sha256, offset = weights_to_inputs(model, names, out / WEIGHTS, onnx_path.parent, dtype, transposed)
    add_scoring_head(g)
    _prune(g)
    if dtype == "float16":
        _cast_weights(g, [p.name for p in params])
    onnx.checker.check_model(model)
    with atomic_open(out / GRAPH, "wb") as fo:
        fo.write(model.SerializeToString())
    hf_config = json.loads(config.to_json_string(use_diff=False))  # every default explicit: tie_word_embeddings
    hf_config.pop("_name_or_path", None)  # the temporary folder it was read from
    write_json(out / HF_CONFIG, hf_config)
    inputs = tuple(i.name for i in g.input if i.name in DATA_INPUTS)
    manifest = Manifest(graph=GRAPH, weights=WEIGHTS, weights_sha256=sha256, weights_bytes=offset,
                        parameters=tuple(params), inputs=inputs, outputs=(OUTPUT,), tokenizer=tokenizer,
                        tied=torch_params.tied, source=source | {"architecture": (config.architectures or ["?"])[0]})
    manifest.save(out)
    return manifest


def weights_to_inputs(model, names: dict[str, str], path: Path, base: Path, dtype: str | None = None,
                      transposed: set[str] = frozenset()) -> tuple[list[Parameter], str, int]:
    """Move the initializers `names` maps (initializer name -> parameter name) out of `model`
    into the flat weight file `path` and make them graph inputs under their parameter names.

    Streamed in graph order, one tensor in memory at a time, each 64-byte aligned, as `dtype`
    (default: its own), those in `transposed` stored transposed. What stays external (`base`
    is its folder) is small and is pulled into the graph. Returns the parameters, the file's
    sha256 and its size."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    g = model.graph
    params: list[Parameter] = []
    keep = []
    offset = 0
    h = hashlib.sha256()
    with atomic_open(path, "wb") as f:
        for init in g.initializer:
            if init.name not in names:
                keep.append(init)
                continue
            arr = numpy_helper.to_array(init, str(base))
            flip = init.name in transposed
            kind = dtype or arr.dtype.name
            start = aligned(offset)
            pad = b"\0" * (start - offset)
            f.write(pad)
            h.update(pad)
            offset = start + _write(f, h, arr.T if flip else arr, kind)
            params.append(Parameter(names[init.name], arr.shape[::-1] if flip else arr.shape, kind, start, flip))
            del arr
    del g.initializer[:]
    g.initializer.extend(keep)
    load_external_data_for_model(model, str(base))
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
    for p in params:
        g.input.append(helper.make_tensor_value_info(p.name, helper.np_dtype_to_tensor_dtype(np.dtype(p.dtype)),
                                                     list(p.shape)))
    return params, h.hexdigest(), offset


def _parameter_initializers(g, torch_params: TorchParameters) -> dict[str, str]:
    """Initializer name -> PyTorch name, for every parameter of the model.

    The unfolded export keeps each parameter one initializer named after it (a tied one under
    either of its names), so names are looked up, never inferred from node scopes, which some
    families skip (OPT's scopes lack `model.`)."""
    names = {}
    for init in g.initializer:
        name = torch_params.canonical(init.name)
        if name is None:
            continue
        if tuple(init.dims) != torch_params.shapes[name]:
            raise OrtzoError(f"{init.name} has shape {tuple(init.dims)} in the graph but "
                             f"{torch_params.shapes[name]} in PyTorch")
        names[init.name] = name
    missing = sorted(set(torch_params.shapes) - set(names.values()))
    if missing:
        raise OrtzoError(f"the graph holds no initializer for {len(missing)} PyTorch parameters (e.g. {missing[0]}): "
                         "exported with constant folding (use trace.optimum_export), or unused by text generation")
    return names


def _fold_transposes(g, names: dict[str, str]) -> set[str]:
    """Parameters used only through 2-D Transposes (Linear weights: MatMul(x, Transpose(W))): their
    consumers now read them directly, and they are to be stored transposed ([in, out]).

    Weights are graph inputs, which ORT cannot constant-fold: left in place, each Transpose would
    run at every step. A parameter with other uses (a tied embedding, also Gathered) keeps its
    layout; the scoring head reads its Transpose as a Gemm with transB."""
    matrices = {i.name for i in g.initializer if i.name in names and len(i.dims) == 2}
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


def _write(f: IO[bytes], h: Any, arr: np.ndarray, dtype: str) -> int:
    """Write `arr` as C-ordered `dtype` bytes, a block of rows at a time, so that a transposed
    or cast copy of a large tensor (an untied lm_head) never exists whole. Returns the bytes."""
    rows = arr.reshape(len(arr), -1) if arr.ndim > 1 else arr.reshape(1, -1)
    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    for i in range(0, len(rows), step):
        data = memoryview(np.ascontiguousarray(rows[i:i + step], dtype=dtype)).cast("B")
        f.write(data)
        h.update(data)
    return rows.size * np.dtype(dtype).itemsize


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
