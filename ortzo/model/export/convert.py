"""The ortzo pass over an Optimum export: every weight under its PyTorch name, tied weights
one buffer, the weights moved out of the graph into named inputs and one aligned flat file
(streamed one tensor at a time: no 2 GB protobuf limit, low memory), the scoring head added.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import OrtzoError
from ...files import atomic_open
from ..manifest import Manifest, Parameter, aligned
from .head import INPUTS as HEAD_INPUTS
from .head import OUTPUT, add_scoring_head
from .trace import GRAPH

WEIGHTS = "weights.bin"
DATA_INPUTS = ("input_ids", "attention_mask", "position_ids", *HEAD_INPUTS)


def _pytorch_params(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    if not shapes:
        raise OrtzoError(f"{hf_dir} has no .safetensors weights")
    return shapes


def convert(onnx_path: Path, hf_dir: Path, out: Path, tokenizer: dict[str, Any],
            source: dict[str, Any], dtype: str = "float32") -> Manifest:
    """The ortzo pass over an Optimum export. Writes model.onnx, weights.bin, manifest.json.

    dtype "float16" stores the weights in fp16 (half the file); the graph casts each to fp32
    where it is used, so compute stays fp32 on every provider (on CPU the casts cost more
    memory than fp16 saves: the README has the figures)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model
    from transformers import AutoConfig

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    shapes = _pytorch_params(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)  # defaults included: tie_word_embeddings is often implicit
    tied = {"lm_head.weight": _embedding_name(g)} if config.tie_word_embeddings else {}

    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    names = {}  # initializer name -> (pytorch name, transposed)
    for init in g.initializer:
        name = _pytorch_name(init, consumers, shapes, tied)
        if name is not None:
            names[init.name] = name

    params: list[Parameter] = []
    rename: dict[str, str] = {}
    keep = []
    offset = 0
    h = hashlib.sha256()
    base = str(onnx_path.parent)
    originals: dict[str, Any] = {}
    with atomic_open(out / WEIGHTS, "wb") as f:
        for init in g.initializer:
            if init.name not in names:
                keep.append(init)
                continue
            pt_name, transposed = names[init.name]
            if pt_name in tied:  # a second copy of a tied weight: point it at the first
                rename[init.name] = _retie(g, init, originals.get(tied[pt_name]), base)
                continue
            arr = numpy_helper.to_array(init, base).astype(dtype, copy=False)
            start = aligned(offset)
            pad = b"\0" * (start - offset)
            f.write(pad)
            h.update(pad)
            data = memoryview(np.ascontiguousarray(arr)).cast("B")
            f.write(data)
            h.update(data)
            offset = start + arr.nbytes
            params.append(Parameter(pt_name, tuple(arr.shape), dtype, start, transposed))
            rename[init.name] = pt_name
            originals[pt_name] = init
            del arr, data
    del g.initializer[:]
    g.initializer.extend(keep)
    # What remains external is small (graph constants, Constant nodes): pull it into the graph.
    load_external_data_for_model(model, base)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for p in params:
        g.input.append(helper.make_tensor_value_info(p.name, onnx.TensorProto.FLOAT, list(p.shape)))
    add_scoring_head(g)
    _prune(g)
    if dtype == "float16":
        _cast_weights(g, [p.name for p in params])
    onnx.checker.check_model(model)
    with atomic_open(out / GRAPH, "wb") as fo:
        fo.write(model.SerializeToString())
    inputs = tuple(i.name for i in g.input if i.name in DATA_INPUTS)
    manifest = Manifest(graph=GRAPH, weights=WEIGHTS, weights_sha256=h.hexdigest(), weights_bytes=offset,
                        parameters=tuple(params), inputs=inputs, outputs=(OUTPUT,), tokenizer=tokenizer,
                        tied=tied, source=source | {"architecture": (config.architectures or ["?"])[0]})
    manifest.save(out)
    return manifest


def _embedding_name(g) -> str:
    for node in g.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids":
            return node.input[0]
    raise OrtzoError("cannot find the token embedding (a Gather on input_ids) in the exported graph")


_SCOPE = re.compile(r"^/(.+)/(MatMul|Gemm)(_\d+)?$")


def _pytorch_name(init, consumers, shapes, tied) -> tuple[str, bool] | None:
    """(PyTorch name, transposed) for a weight initializer; None for graph constants."""
    dims = tuple(init.dims)
    if init.name in shapes and shapes[init.name] == dims:
        return init.name, False
    for node in consumers.get(init.name, []):
        m = _SCOPE.match(node.name)
        if m and len(node.input) > 1 and node.input[1] == init.name:
            name = m.group(1).replace("/", ".") + ".weight"
            if shapes.get(name) == dims[::-1] or (name in tied and len(dims) == 2):
                return name, True
    return None


def _retie(g, init, original, base: str) -> str:
    """Replace a (transposed) copy of a tied weight by a Transpose of the original.

    Optimum de-duplicates only modules it knows (Gemma 3's scaled embedding is not one)."""
    from onnx import helper, numpy_helper

    if original is None:
        raise OrtzoError(f"tied weight {init.name} comes before the weight it is tied to")
    if not np.array_equal(numpy_helper.to_array(original, base).T, numpy_helper.to_array(init, base)):
        raise OrtzoError(f"{init.name} is meant to be tied to {original.name} but holds other values")
    out = f"{original.name}_transposed"
    g.node.insert(0, helper.make_node("Transpose", [original.name], [out], perm=[1, 0], name="ortzo/retie"))
    return out



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
