"""A frozen base: a trainable folder turned into one whose matrices are constants of the graph
(fp32, or quantized to int4/int8 MatMulNBits) and whose trained tensors, the vectors and
optional LoRA A/B beside the matrices, are the only weights left in `weights.bin`.

MeZO's default recipe perturbs only the vectors, so the matrices never need to be mutable: as
initializers ORT prepacks them, quantized they take an eighth (int4) or a quarter (int8) of
their fp32 bytes, and a run's checkpoints hold kilobytes. Each trained tensor is both a graph
input and an initializer holding its starting value (an "overridable initializer"), so the
graph also runs as a plain inference model without them, and an ORT adapter (model/adapter.py)
sets them per request over the unchanged base.

The source folder is read one tensor at a time (pread(2) of its weight file) and the
frozen data is written one tensor at a time (model/external.py), so freezing a 7B folder holds
one matrix, not the model. Needs onnx (the `onnx` extra).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OrtzoError
from ..files import atomic_open
from . import lora as lora_graph
from .export.convert import _prune, declare_inputs
from .export.flatfile import FlatWriter
from .export.head import LM_HEAD
from .external import DataFile
from .logits import write_logits_graph
from .manifest import HF_CONFIG, Manifest, Parameter
from .quantize import QuantSpec, matmul_nbits, quantize

BASE_DATA = "base.onnx_data"
WEIGHTS = "weights.bin"


def freeze(src: str | Path, out: str | Path, quant: QuantSpec | None = None,
           lora: lora_graph.LoraSpec | None = None, stored_bits: Mapping[str, int] | None = None) -> Manifest:
    """Write the frozen-base folder of the trainable folder `src` into the empty folder `out`.
    Every matrix that is only ever B of x @ B becomes MatMulNBits under `quant` (others, such as
    a tied embedding, stay constants as stored); `lora` adds A and B beside the matching ones.
    `stored_bits`: the bits a GGUF source stores each matrix at (for `quant.source_widths`)."""
    import onnx

    src, out = Path(src), Path(out)
    m = Manifest.load(src)
    if m.base:
        raise OrtzoError(f"{src} already has a frozen base ({m.base['quantize']}); freeze the folder it came from")
    model = onnx.load(str(src / m.graph), load_external_data=False)
    g = model.graph
    def value(p: Parameter) -> np.ndarray:
        """The source's tensor `p`, read with pread: a map's touched pages would count in RSS."""
        buf = bytearray(p.nbytes)
        if os.preadv(source, [buf], p.offset) != p.nbytes:
            raise OrtzoError(f"{src / m.weights} ends inside {p.name}: the folder's weight file is truncated")
        return np.frombuffer(buf, p.dtype).reshape(p.shape)

    trained = [p for p in m.parameters if len(p.shape) == 1]  # the vectors
    frozen = {p.name: p for p in m.parameters if len(p.shape) != 1}
    casts = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Cast" and n.input[0] in frozen}  # fp16 folders
    matmuls = _matmul_weights(g, frozen, casts)
    read_transposed = {w for w, nodes in matmuls.items() if _transposed_b(nodes[0])}  # stored [out, in]
    kn = {w: frozen[w].shape[::-1] if w in read_transposed else frozen[w].shape
          for w in matmuls}  # each as x @ B reads it: [in, out]
    targets = lora_graph.targeted(lora, sorted(matmuls, key=list(frozen).index)) if lora else []
    head = next((n.input[1] for n in g.node if n.name == LM_HEAD), None)  # a prepared folder has no scoring head
    untied_head = {casts.get(head, head)} & set(matmuls) if head else set()
    tables: dict[str, bool] = {}
    bits: dict[str, int] = {}  # what is quantized, to how many bits
    if quant is not None:
        bits = quant.widths(list(matmuls), stored_bits)
        if quant.embedding:
            tables = _embeddings(g, frozen, casts, quant.block_size)
            bits |= {w: quant.embedding for w in [*tables, *untied_head]}
        else:
            bits = {w: b for w, b in bits.items() if w not in untied_head}

    # the tensors: frozen ones into the base's data file, trained ones into the weight file and,
    # as their starting values, into the data file too
    out.mkdir(parents=True, exist_ok=True)
    weights = FlatWriter(out / WEIGHTS)
    source = os.open(src / m.weights, os.O_RDONLY)
    with atomic_open(out / BASE_DATA, "wb") as f, _closing(source):
        data = DataFile(f, BASE_DATA)
        inits = [data.add(p.name, value(p)) for p in frozen.values() if p.name not in bits]
        nodes, added = _rewrite(g, matmuls, read_transposed, bits, tables, targets, quant, lora, frozen, value, data,
                                inits)
        for p in trained:
            weights.add(p.name, value(p), p.dtype)
            inits.append(data.add(p.name, value(p)))
        for name, (a, b) in added.items():
            for tensor_name, arr in zip(lora_graph.names(name), (a, b), strict=True):
                weights.add(tensor_name, arr.T, "float32", transposed=True)  # given in PyTorch's layout
                inits.append(data.add(tensor_name, arr))
    weights_sha256 = weights.close()
    params = [weights.written[p.name] for p in trained] + \
             [weights.written[n] for name in added for n in lora_graph.names(name)]

    # the graph: frozen weights are no longer inputs; trained ones are inputs with defaults
    _replace(g.node, nodes)
    _replace(g.input, [i for i in g.input if i.name not in frozen])
    declare_inputs(g, [p for p in params if p.name not in {i.name for i in g.input}])
    g.initializer.extend(inits)
    if lora is not None:
        g.initializer.append(onnx.numpy_helper.from_array(np.array(lora.scale, np.float32), lora_graph.SCALE))
    if quant is not None:
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _prune(g)
    graph_bytes = model.SerializeToString()
    with atomic_open(out / m.graph, "wb") as f:
        f.write(graph_bytes)
    onnx.checker.check_model(str(out / m.graph))  # by path: it checks the data file beside the graph
    for name in {HF_CONFIG, m.tokenizer.get("file", "tokenizer.json") if m.tokenizer else None} - {None}:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)

    base: dict[str, Any] = {
        "data": BASE_DATA, "data_bytes": data.size, "data_sha256": data.sha256,
        "id": int(hashlib.sha256(graph_bytes + data.sha256.encode()).hexdigest()[:7], 16),  # an adapter's model version
        **(quant.to_json() if quant else {"quantize": "none"}),
        "frozen": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "transposed": p.transposed,
                    "stored": f"int{bits[p.name]}" if p.name in bits else p.dtype}
                   | ({"k_n": list(kn[p.name] if p.name in kn else p.shape[::-1]),
                       "stored_out_in": p.name in read_transposed or p.name in tables} if p.name in bits else {})
                   for p in frozen.values()],  # k_n: as MatMulNBits reads it; stored_out_in: held [N, K];
        # transposed: the folder's layout is PyTorch's transposed (model/dequantize.py reads it back)
        "lora": lora.to_json() | {"modules": [lora_graph.module(n) for n in added]} if lora else None}
    manifest = replace(m, weights=WEIGHTS, weights_sha256=weights_sha256, weights_bytes=weights.size,
                       parameters=tuple(params), base=base, logits_graph=None, ort_graph=None)
    manifest.save(out)
    return write_logits_graph(out) if m.logits_graph else manifest  # a prepared folder has no scoring head


@contextmanager
def _closing(fd: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(fd)


def _replace(items: Any, new: list[Any]) -> None:
    """Replace a repeated protobuf field's items."""
    del items[:]
    items.extend(new)


def _uses(g, frozen: dict[str, Parameter], casts: dict[str, str]) -> dict[str, list[tuple[Any, int]]]:
    """Each frozen weight's readers as (node, input index), seeing through an fp16 folder's casts."""
    uses: dict[str, list[tuple[Any, int]]] = {}
    for node in g.node:
        if node.op_type == "Cast" and node.output[0] in casts:
            continue  # see through it: its consumers are the weight's
        for i, name in enumerate(node.input):
            name = casts.get(name, name)
            if name in frozen:
                uses.setdefault(name, []).append((node, i))
    return uses


def _matmul_weights(g, frozen: dict[str, Parameter], casts: dict[str, str]) -> dict[str, list[Any]]:
    """Frozen matrices that are only ever B of x @ B (a MatMul, or a plain Gemm x @ B + bias, as
    GPT-2's Conv1D traces), directly or through an fp16 folder's cast, with those nodes: the
    Linear weights, which can be quantized and carry a LoRA. A tied embedding, also Gathered,
    is not among them."""
    return {name: [n for n, _ in u] for name, u in _uses(g, frozen, casts).items()
            if all(i == 1 and _is_linear(n) for n, i in u)}


def _is_linear(node) -> bool:
    """MatMul, or Gemm computing x @ B + C or x @ B^T + C (OPT's MLP on flattened rows) exactly:
    unit alpha and beta, A not transposed."""
    if node.op_type == "MatMul":
        return True
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return node.op_type == "Gemm" and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 \
        and attrs.get("beta", 1.0) == 1.0


def _transposed_b(node) -> bool:
    """A Gemm that reads its B transposed: the weight is stored [out, in]."""
    from onnx import helper

    return node.op_type == "Gemm" and any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute)


def _embeddings(g, frozen: dict[str, Parameter], casts: dict[str, str], block_size: int) -> dict[str, bool]:
    """Frozen tables [vocab, hidden] that are only Gathered by row and multiplied as a tied head
    (Gemm with transB), with whether they are a head: quantized along hidden, the same bytes
    serve both (GatherBlockQuantized, MatMulNBits). A hidden size that the block size does not
    divide keeps its table as stored."""
    from onnx import helper

    def row_use(node, i: int) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gather":
            return i == 0 and attrs.get("axis", 0) == 0
        return node.op_type == "Gemm" and i == 1 and attrs.get("transB", 0) == 1 and not attrs.get("transA", 0) \
            and attrs.get("alpha", 1.0) == 1.0 and len(node.input) == 2

    return {name: any(n.op_type == "Gemm" for n, _ in u) for name, u in _uses(g, frozen, casts).items()
            if len(frozen[name].shape) == 2 and frozen[name].shape[1] % block_size == 0
            and all(row_use(n, i) for n, i in u) and any(n.op_type == "Gather" for n, _ in u)}


def _rewrite(g, matmuls: dict[str, list[Any]], read_transposed: set[str], bits: dict[str, int],
             tables: dict[str, bool], targets: list[str],
             quant: QuantSpec | None, lora: lora_graph.LoraSpec | None, frozen: dict[str, Parameter],
             value: Callable[[Parameter], np.ndarray], data: DataFile,
             inits: list[Any]) -> tuple[list[Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The graph's nodes with each x @ B over a matrix quantized to `bits` made MatMulNBits (a
    Gemm's bias added after it), each quantized table's Gather made GatherBlockQuantized and its
    tied head MatMulNBits (initializers appended to `inits`), and a LoRA branch after each
    targeted matrix; returns (nodes, {weight: (A, B) starting values})."""
    import onnx

    packed: dict[str, tuple[dict[str, str], int, int]] = {}  # weight -> (initializer names by role, K, N)

    def pack(w: str) -> tuple[dict[str, str], int, int]:
        """Quantize `w` once: a matrix as B [in, out] for MatMulNBits, a table [vocab, hidden] as
        its rows for GatherBlockQuantized ([vocab, hidden * bits / 8]) and, if it is a tied
        head, the same bytes as MatMulNBits' B too."""
        assert quant is not None
        if w not in packed:
            b, symmetric = bits[w], quant.symmetric or w in tables  # GatherBlockQuantized: no float zero points
            as_b = value(frozen[w]).T if w in tables or w in read_transposed else value(frozen[w])  # [in, out]
            q = quantize(as_b, b, quant.block_size, symmetric)
            parts = {"scales": (f"{w}/scales", q.scales)}
            if q.zero_points is not None:
                parts["zero_points"] = (f"{w}/zero_points", q.zero_points)
            if tables.get(w, True):
                parts["B"] = (f"{w}/q{b}", q.packed)
            if w in tables:
                parts["rows"] = (f"{w}/q{b}/rows", q.packed.reshape(q.n, -1))
            inits.extend(data.add(n, a) for n, a in parts.values())
            packed[w] = ({role: n for role, (n, _) in parts.items()}, q.k, q.n)
        return packed[w]

    def scales(names: dict[str, str]) -> list[str]:
        """The scales and zero points that follow the quantized data in either node's inputs."""
        return [names["scales"], *([names["zero_points"]] if "zero_points" in names else [])]

    weight_of = {id(node): w for w, nodes in matmuls.items() for node in nodes}
    added: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    nodes = []
    for node in g.node:
        w = weight_of.get(id(node))
        table = next((t for t in tables if t in node.input or f"{t}/fp32" in node.input), None)
        if table is not None:
            assert quant is not None
            names, k, n = pack(table)
            if node.op_type == "Cast":
                continue  # an fp16 folder's cast of the table: nothing reads it now
            if node.op_type == "Gather":
                nodes.append(onnx.helper.make_node(
                    "GatherBlockQuantized", [names["rows"], node.input[1], *scales(names)], list(node.output),
                    name=f"{node.name or table}/q", domain="com.microsoft", gather_axis=0,
                    quantize_axis=1, block_size=quant.block_size, bits=bits[table]))
            else:  # the tied head
                nodes.append(matmul_nbits(node.input[0], [names["B"], *scales(names)], node.output[0], k, n,
                                          bits[table], quant, node.name or f"{table}/q"))  # the head keeps its name
            continue
        if w is None:
            nodes.append(node)
            continue
        x, out = node.input[0], node.output[0]
        base_out = f"{out}/base" if w in targets else out
        if w in bits:
            names, k, n = pack(w)
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
            product = f"{base_out}/product" if bias else base_out
            nodes.append(matmul_nbits(x, [names["B"], *scales(names)], product, k, n, bits[w], quant,
                                      node.name or f"{w}/q"))
            if bias:
                nodes.append(onnx.helper.make_node("Add", [product, bias], [base_out], name=f"{node.name or w}/bias"))
        else:
            node.output[0] = base_out
            nodes.append(node)
        if w in targets:
            assert lora is not None
            if w not in added:
                k, n = frozen[w].shape
                added[w] = lora_graph.initial(lora, (n, k) if w in read_transposed else (k, n), len(added))
            nodes.extend(lora_graph.branch(x, base_out, out, w))
    return nodes, added
