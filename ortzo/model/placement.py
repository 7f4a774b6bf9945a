"""`ortzo placement`: which nodes of the trainable graph each mobile provider would take, with
the weights as graph inputs, and what falls back to the CPU provider.

The graph is what a provider is handed: model.onnx with the batch shape fixed (free-dimension
overrides; NNAPI, CoreML and QNN need static shapes), after ORT's basic optimizations (ORT
partitions after them; constant folding turns the fixed shape's arithmetic into initializers).
A weight is a graph input, never a constant initializer: the one property that decides
MatMul and Gemm on most providers.

Each provider's rows come from one source, named on every row:
- ORT's partitioning, where this machine can start the provider: built into this onnxruntime,
  or a plugin package (`onnxruntime-qnn` ships QNN with its HTP backend for Linux x86-64). A
  session records which provider each node went to (`session.record_ep_graph_assignment_info`).
- Otherwise documented rules: the support lists this onnxruntime version ships with its mobile
  usability checker (onnxruntime/tools/mobile_helpers/*.md) and the conditions of the op
  builders' source read for MatMul, Gemm and Softmax (files named below). A node whose
  inputs the rule cannot vouch for (integer or bool tensors, for builders whose type checks
  were not read) is "unknown", never counted as taken.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVIDERS = ("xnnpack", "nnapi", "coreml-nn", "coreml", "qnn")
HEAVY = ("MatMul", "Gemm")
FLOAT, INT32, BOOL, FLOAT16 = 1, 6, 9, 10
# inputs a support list's note may require to be constant initializers
CONSTANT_INPUTS = {"Slice": slice(1, None), "Squeeze": slice(1, 2), "Unsqueeze": slice(1, 2), "Split": slice(1, 2),
                   "Gather": slice(1, 2)}

ORT_SRC = "microsoft/onnxruntime onnxruntime/core/providers/"
XNNPACK_SRC = {"list": ORT_SRC + "xnnpack/detail/node_support_checker.cc (6479e4b)",
               "MatMul": ORT_SRC + "xnnpack/math/matmul.cc (06dd121)",
               "Gemm": ORT_SRC + "xnnpack/math/gemm.cc (2944c6f)",
               "Softmax": ORT_SRC + "xnnpack/math/softmax.cc (d018c97)"}
XNNPACK_OPS = ("Conv", "ConvTranspose", "QLinearConv", "MaxPool", "AveragePool", "Softmax", "Resize", "Gemm", "MatMul")
COREML_GEMM_SRC = ORT_SRC + "coreml/builders/impl/gemm_op_builder.cc (02d9b9e)"
NNAPI_GEMM_SRC = ORT_SRC + "nnapi/nnapi_builtin/builders/impl/gemm_op_builder.cc (3873a55), op_builder_helpers.cc"
LISTS = {"nnapi": "nnapi_supported_ops.md", "coreml-nn": "coreml_supported_neuralnetwork_ops.md",
         "coreml": "coreml_supported_mlprogram_ops.md"}
EP_NAMES = {"xnnpack": "XnnpackExecutionProvider", "nnapi": "NnapiExecutionProvider",
            "coreml-nn": "CoreMLExecutionProvider", "coreml": "CoreMLExecutionProvider",
            "qnn": "QNNExecutionProvider"}
EP_OPTIONS = {"coreml-nn": {"ModelFormat": "NeuralNetwork"}, "coreml": {"ModelFormat": "MLProgram"}}
# Plugin packages that bring a provider to this onnxruntime: module, options for it. QNN's HTP
# backend computes fp32 graphs in fp16 (which needs a SoC: SM8650, Snapdragon 8 Gen 3, HTP v75).
PLUGINS: dict[str, tuple[str, Callable[[Any], dict[str, str]]]] = {
    "qnn": ("onnxruntime_qnn", lambda m: {"backend_path": m.get_qnn_htp_path(), "enable_htp_fp16_precision": "1",
                                          "soc_model": "57", "htp_arch": "75"})}


@dataclass(frozen=True)
class Node:
    """What the rules read of one node: its inputs' dtypes and static shapes (None: unknown)
    and which inputs are constant initializers."""

    name: str
    op: str
    domain: str
    inputs: tuple[str, ...]
    dtypes: tuple[int | None, ...]
    shapes: tuple[tuple[int, ...] | None, ...]
    constant: tuple[bool, ...]
    attrs: dict[str, Any]

    def flops(self) -> int:
        """2 M K N per matrix product for MatMul and Gemm (0 where a shape is unknown)."""
        a, b = self.shapes[0], self.shapes[1]
        if self.op not in HEAVY or a is None or b is None:
            return 0
        if self.op == "Gemm":
            m, k = (a[::-1] if self.attrs.get("transA") else a)
            return 2 * m * k * (b[0] if self.attrs.get("transB") else b[1])
        batch = 1
        for d in (a[:-2] if len(a) >= len(b) else b[:-2]):
            batch *= d
        return 2 * batch * (a[-2] if len(a) > 1 else 1) * a[-1] * b[-1]


@dataclass(frozen=True)
class Verdict:
    taken: bool | None  # None: unknown
    why: str
    source: str


def report(folder: Path, providers: list[str], batch_size: int, seq_len: int) -> dict[str, list[dict]]:
    """Print one markdown table per provider and a summary; returns the rows."""
    with tempfile.TemporaryDirectory(prefix="ortzo-placement-") as tmp:
        return _report(folder, providers, batch_size, seq_len, Path(tmp))


def _report(folder: Path, providers: list[str], batch_size: int, seq_len: int, tmp: Path) -> dict[str, list[dict]]:
    nodes, graph = _graph(folder, batch_size, seq_len, tmp)
    heavy = [n for n in nodes if n.op in HEAVY]
    flops = sum(n.flops() for n in heavy)
    print(f"{folder.name}: {len(nodes)} nodes ({len(heavy)} MatMul/Gemm) at batch {batch_size} x seq {seq_len}, "
          f"model.onnx after ORT's basic optimizations; weights are graph inputs\n")
    summary, tables = [], {}
    for p in providers:
        verdicts = _ort_partitioning(graph, p, nodes) or [_rule(p, n) for n in nodes]
        rows = Counter((n.op, v.taken, v.why, v.source) for n, v in zip(nodes, verdicts, strict=True))
        tables[p] = [{"op": op, "nodes": c, "taken": t, "why": why, "source": src}
                     for (op, t, why, src), c in sorted(rows.items(), key=lambda kv: (kv[0][1] is not True, -kv[1]))]
        took = [n for n, v in zip(nodes, verdicts) if v.taken]
        unknown = sum(v.taken is None for v in verdicts)
        heavy_took = [n for n in took if n.op in HEAVY]
        summary.append(f"| {p} | {_source_kind(verdicts)} | {len(took)} of {len(nodes)} ({unknown} unknown) | "
                       f"{len(heavy_took)} of {len(heavy)} | {sum(n.flops() for n in heavy_took) / (flops or 1):.1%} |")
        print(f"### {p}\n\n| op type | nodes | placement | why | source |\n|---|---|---|---|---|")
        for r in tables[p]:
            where = {True: "taken", False: "falls back to CPU", None: "unknown"}[r["taken"]]
            print(f"| {r['op']} | {r['nodes']} | {where} | {r['why']} | {r['source']} |")
        print()
    print("### summary\n\n| provider | from | nodes taken | MatMul/Gemm nodes taken | MatMul/Gemm FLOPs taken |\n"
          "|---|---|---|---|---|")
    print("\n".join(summary))
    return tables


def _source_kind(verdicts: list[Verdict]) -> str:
    return "ORT partitioning" if verdicts and verdicts[0].source.startswith("ORT partitioning") else "documented rules"


def _graph(folder: Path, batch_size: int, seq_len: int, tmp: Path) -> tuple[list[Node], Path]:
    """The nodes as a provider sees them, and the fixed-shape graph file (written in `tmp`)
    that ORT's partitioning runs on."""
    import onnx
    import onnxruntime as ort
    from onnx import shape_inference

    from .manifest import Manifest

    manifest = Manifest.load(folder)
    so = _fixed(ort.SessionOptions(), batch_size, seq_len)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp / "basic.onnx")
    ort.InferenceSession(str(folder / manifest.graph), so, providers=["CPUExecutionProvider"])
    model = shape_inference.infer_shapes(onnx.load(so.optimized_model_filepath), data_prop=True)
    g = model.graph
    types = {v.name: v.type.tensor_type for v in (*g.value_info, *g.input, *g.output)}
    inits = {i.name: i for i in g.initializer}

    def dtype(name: str) -> int | None:
        return inits[name].data_type if name in inits else (types[name].elem_type if name in types else None)

    def shape(name: str) -> tuple[int, ...] | None:
        if name in inits:
            return tuple(inits[name].dims)
        t = types.get(name)
        if t is None or not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
            return None
        return tuple(d.dim_value for d in t.shape.dim)

    nodes = [Node(n.name, n.op_type, n.domain or "ai.onnx", tuple(n.input), tuple(dtype(i) for i in n.input),
                  tuple(shape(i) for i in n.input), tuple(i in inits for i in n.input),
                  {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in g.node]
    return nodes, Path(so.optimized_model_filepath)


def _fixed(so: Any, batch_size: int, seq_len: int) -> Any:
    """Session options that fix the trainable graph's free dimensions: the batch, and one
    scored row per example with two candidates (a two-label task)."""
    for name, value in (("batch_size", batch_size), ("sequence_length", seq_len), ("n_scored", batch_size),
                        ("n_candidates", 2)):
        so.add_free_dimension_override_by_name(name, value)
    return so


def _ort_partitioning(graph: Path, provider: str, nodes: list[Node]) -> list[Verdict] | None:
    """Each node's provider from a session ORT partitions, or None where this machine cannot
    start the provider. The graph is already optimized, so the session's nodes are its nodes."""
    import onnxruntime as ort

    ep = EP_NAMES[provider]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized already: keep its nodes
    so.log_severity_level = 3
    kwargs: dict[str, Any] = {}
    if ep in ort.get_available_providers():
        providers = list(dict.fromkeys((ep, "CPUExecutionProvider")))
        kwargs = {"providers": providers, "provider_options": [EP_OPTIONS.get(provider, {}), {}][:len(providers)]}
        how = f"built into onnxruntime {ort.__version__}"
    elif provider in PLUGINS and importlib.util.find_spec(PLUGINS[provider][0]):
        module = importlib.import_module(PLUGINS[provider][0])
        if ep not in {d.ep_name for d in ort.get_ep_devices()}:
            ort.register_execution_provider_library(ep, module.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == ep]
        so.add_provider_for_devices(devices, PLUGINS[provider][1](module))
        how = f"plugin {module.__name__} {getattr(module, '__version__', '')}".strip()
    else:
        return None
    try:
        session = ort.InferenceSession(str(graph), so, **kwargs)
    except Exception as e:  # ORT raises its own types when a provider fails to compile
        return [Verdict(None, f"the session did not start: {str(e).splitlines()[0][:160]}",
                        f"ORT partitioning ({how})")] * len(nodes)
    placed = {n.name: sub.ep_name for sub in session.get_provider_graph_assignment_info() for n in sub.get_nodes()}
    return [Verdict(placed.get(n.name) == ep if n.name in placed else None,
                    f"assigned to {placed[n.name]}" if n.name in placed else
                    "not among the partitioned nodes (ORT replaced it while partitioning)",
                    f"ORT partitioning ({how})") for n in nodes]


def _rule(provider: str, n: Node) -> Verdict:
    if provider == "xnnpack":
        return _xnnpack(n)
    if provider == "qnn":
        return _qnn(n)
    return _listed(provider, n)


def _xnnpack(n: Node) -> Verdict:
    src = XNNPACK_SRC.get(n.op, XNNPACK_SRC["list"])
    if n.domain != "ai.onnx" or n.op not in XNNPACK_OPS:
        return Verdict(False, "no XNNPACK kernel for this op", src)
    if n.dtypes[0] != FLOAT:
        return Verdict(False, "input is not float32", src)
    if n.op == "MatMul":
        if not n.constant[1]:
            return Verdict(False, "B is not a constant initializer (XNNPACK prepacks B)", src)
        a, b = n.shapes[0], n.shapes[1]
        ok = a is not None and b is not None and len(b) <= 2 and len(a) in (len(b), len(b) + 1)
        return Verdict(ok, "constant B" if ok else "B rank > 2 or A rank not rank(B)(+1)", src)
    if n.op == "Gemm":
        if not all(n.constant[1:]):
            return Verdict(False, "B (and C) must be constant initializers (XNNPACK prepacks B)", src)
        return Verdict(n.attrs.get("alpha", 1.0) == 1 and n.attrs.get("beta", 1.0) == 1, "constant B", src)
    if n.op == "Softmax":
        s = n.shapes[0]
        ok = s is not None and n.attrs.get("axis", -1) in (-1, len(s) - 1)
        return Verdict(ok, "float32, last axis, static last dimension" if ok else "not the last axis", src)
    return Verdict(None, "kernel exists; its conditions were not checked", src)


def _qnn(n: Node) -> Verdict:
    src = "documented rules (../shared/notes/ort-targets.md, from QNN's provider source)"
    if n.op in HEAVY:
        return Verdict(True, "QNN MatMul/FullyConnected take a non-constant B (HTP: fp16 or quantized)", src)
    return Verdict(None, "not checked without the provider (pip install onnxruntime-qnn for ORT's partitioning)",
                   "unknown")


def _listed(provider: str, n: Node) -> Verdict:
    """NNAPI and CoreML: the op must be in the provider's support list; MatMul/Gemm follow the
    builders' conditions; a listed op's note is applied where it names constant inputs or
    types; otherwise it is taken only if every non-constant input is float."""
    notes = _support_list(provider)
    src = f"documented rules (onnxruntime/tools/mobile_helpers/{LISTS[provider]})"
    key = f"{n.domain}:{n.op}"
    if key not in notes:
        return Verdict(False, "not in the provider's support list", src)
    note = notes[key]
    if n.op in HEAVY:
        return _nnapi_gemm(n) if provider == "nnapi" else _coreml_gemm(n, provider == "coreml")
    constant = CONSTANT_INPUTS.get(n.op)
    int32_indices = n.op == "Gather" and n.dtypes[1] == INT32  # NNAPI: then they may be a tensor
    if constant and "constant" in note and not int32_indices and not all(n.constant[constant]):
        return Verdict(False, f"an input the list requires constant is not: {_plain(note)}", src)
    if n.op == "Gather" and "scalar" in note and n.shapes[1] == ():
        return Verdict(False, _plain(note), src)
    if n.op in ("And", "Where"):  # the lists' type conditions: bool inputs; float branches
        ok = all(t == BOOL for t in n.dtypes) if n.op == "And" else {n.dtypes[1], n.dtypes[2]} <= {FLOAT, FLOAT16}
        return Verdict(ok, _plain(note), src)
    if "fp32" in note and any(t != FLOAT for t in n.dtypes):
        return Verdict(False, _plain(note), src)
    data = [t for t, c in zip(n.dtypes, n.constant) if not c and t is not None]
    if all(t in (FLOAT, FLOAT16) for t in data):
        checked = (constant and "constant" in note) or "fp32" in note
        return Verdict(True, "listed" + (f"; its note holds here: {_plain(note)}" if checked else
                                         f"; its note was not checked: {_plain(note)}" if note else ""), src)
    return Verdict(None, "listed, but an input is an integer or bool tensor and the builder's type check was not "
                   "read", src)


def _nnapi_gemm(n: Node) -> Verdict:
    """NNAPI: a batch MatMul (same-rank >= 3 operands, same leading dimensions, float; NNAPI
    feature level 3) is built from FULLY_CONNECTED per slice, with any B; otherwise A and B
    must be 2-D and B an initializer, except Gemm with transB = 1."""
    a, b = n.shapes[0], n.shapes[1]
    if a is None or b is None:
        return Verdict(False, "a shape is not static", NNAPI_GEMM_SRC)
    if (n.op == "MatMul" and len(a) >= 3 and len(a) == len(b) and a[:-2] == b[:-2] and n.dtypes[0] == FLOAT):
        return Verdict(True, "batch MatMul (needs Android 10, feature level 3)", NNAPI_GEMM_SRC)
    if len(a) != 2 or len(b) != 2:
        return Verdict(False, "not a batch MatMul, and A or B is not 2-D", NNAPI_GEMM_SRC)
    if n.op == "Gemm":
        ok = (n.attrs.get("transA", 0) == 0 and n.attrs.get("alpha", 1.0) == 1 and n.attrs.get("beta", 1.0) == 1
              and (n.attrs.get("transB", 0) == 1 or n.constant[1]))
        return Verdict(ok, "transB = 1: B may be a graph input" if ok else "B is a graph input and transB = 0",
                       NNAPI_GEMM_SRC)
    return Verdict(n.constant[1], "2-D, constant B" if n.constant[1] else "2-D MatMul needs a constant B",
                   NNAPI_GEMM_SRC)


def _coreml_gemm(n: Node, mlprogram: bool) -> Verdict:
    """CoreML: B must be a constant initializer, except for ML Program's MatMul (numpy
    semantics, any B); NeuralNetwork's MatMul is 2-D only; Gemm needs transA = 0, alpha =
    beta = 1 and a constant C."""
    if not n.constant[1] and not (mlprogram and n.op == "MatMul"):
        return Verdict(False, "B is a graph input: only ML Program's MatMul takes a non-constant B", COREML_GEMM_SRC)
    if n.op == "MatMul" and mlprogram:
        return Verdict(n.dtypes[0] in (FLOAT, FLOAT16), "ML Program matmul: any B, numpy semantics", COREML_GEMM_SRC)
    a, b = n.shapes[0], n.shapes[1]
    if n.op == "MatMul":
        ok = a is not None and b is not None and len(a) == len(b) == 2
        return Verdict(ok, "2-D, constant B" if ok else "NeuralNetwork MatMul is 2-D only", COREML_GEMM_SRC)
    ok = (n.attrs.get("transA", 0) == 0 and n.attrs.get("alpha", 1.0) == 1 and n.attrs.get("beta", 1.0) == 1
          and all(n.constant[2:]))
    return Verdict(ok, "constant B" if ok else "transA, alpha, beta or a non-constant C", COREML_GEMM_SRC)


def _support_list(provider: str) -> dict[str, str]:
    """`domain:Op` -> its note, from the list this onnxruntime version ships."""
    import onnxruntime

    text = (Path(onnxruntime.__file__).parent / "tools" / "mobile_helpers" / LISTS[provider]).read_text()
    rows = re.findall(r"^\|(ai\.onnx|com\.microsoft)[:.](\w+)\|(.*)\|$", text, re.M)
    return {f"{d}:{op}": note for d, op, note in rows}


def _plain(note: str) -> str:
    return note.replace("<br/>", " ").replace("|", "/").strip()
