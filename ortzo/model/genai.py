"""onnxruntime-genai folders in: the model an app ships, made trainable where it lies.

onnxruntime-genai's model builder writes the folder an app generates with: `genai_config.json`,
a decoder graph with a KV cache (int4 `MatMulNBits`, `GroupQueryAttention`), its data and the
tokenizer. `prepare_genai` turns it into a folder that is both at once:

- the same onnxruntime-genai folder, whose decoder now also takes the vectors (norm scales) and
  optional LoRA A/B beside its `MatMulNBits` as overridable initializers: og and plain ORT run it
  as shipped, and load ortzo's adapters (`ortzo adapter`) over it per request;
- an ortzo folder whose scoring graph is that decoder with an empty KV cache and ortzo's scoring
  head, so `ortzo finetune` trains the app's own quantized matrices' neighbours.

The quantized matrices are copied as they are, one tensor at a time: nothing is re-quantized.
GroupQueryAttention reads each row's length from the attention mask and takes the padding on
the right, so the folder's tokenizer record says so. Needs onnx (the `onnx` extra).
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OrtzoError
from ..files import atomic_open, check_output_folder
from . import lora as lora_graph
from .export.convert import _prune, declare_inputs
from .export.flatfile import FlatWriter
from .export.head import INPUTS as SCORE_INPUTS, OUTPUT as SCORE_OUTPUT, add_scoring_head
from .external import DataFile
from .frozen import BASE_DATA, WEIGHTS
from .manifest import MANIFEST, Manifest
from .prepare import _load

CONFIG = "genai_config.json"
SCORE_GRAPH = "score.onnx"
TOKENIZER = "tokenizer.json"
EMPTY_CACHE = "ortzo/empty_cache"
FLOAT = 1  # onnx.TensorProto.FLOAT


def is_genai_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def prepare_genai(src: str | Path, out: str | Path, lora: lora_graph.LoraSpec | None = None,
                  force: bool = False) -> Path:
    """Write the trainable twin of the onnxruntime-genai folder `src` into `out` (see the
    module's docstring); `lora` puts A and B beside the MatMulNBits whose module matches.
    `src` is only read; the folder is built beside `out` and renamed into place."""
    import onnx

    src, out = Path(src), Path(out)
    if (src / MANIFEST).is_file():
        raise OrtzoError(f"{src} is prepared already (it has {MANIFEST}): prepare the builder's own folder")
    config = _config(src)
    tokenizer = _tokenizer(src, config)
    decoder = config["model"]["decoder"]
    graph = src / decoder["filename"]
    model = _load(graph)
    g = model.graph
    logits = decoder.get("outputs", {}).get("logits", "logits")
    past = [i.name for i in g.input if _is_past(i.name, decoder)]
    if not past or logits not in {o.name for o in g.output}:
        raise OrtzoError(f"{graph} has no KV cache inputs or no {logits!r} output: not an onnxruntime-genai decoder")
    vectors = {i.name for i in g.initializer if i.data_type == FLOAT and len(i.dims) == 1 and i.dims[0] >= 2}
    if not vectors and lora is None:
        raise OrtzoError(f"{graph} has no float vector (norm scale or bias) to train; add LoRA with --lora")
    nbits = {_module(n): n for n in g.node if n.op_type == "MatMulNBits" and logits not in n.output}
    if not nbits:
        raise OrtzoError(f"{graph} has no MatMulNBits: not a quantized onnxruntime-genai model "
                         "(a float ONNX model: ortzo prepare MODEL.onnx --quantize int4)")
    bits = {_attr(n, "bits") for n in nbits.values()}
    if bits not in ({4}, {8}):
        raise OrtzoError(f"{graph}: its matrices are quantized to {sorted(bits)} bits; ortzo takes int4 or int8 bases")
    targets = lora_graph.targeted(lora, [f"{m}.weight" for m in nbits]) if lora else []
    data_files = {src / e.value for i in g.initializer for e in i.external_data if e.key == "location"}
    check_output_folder(out, force, [graph, *data_files], MANIFEST)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp") as tmp:
        build = Path(tmp) / "genai"
        build.mkdir()
        weights = FlatWriter(build / WEIGHTS)
        with atomic_open(build / BASE_DATA, "wb") as f:
            data = DataFile(f, BASE_DATA)
            inits = []
            for init in g.initializer:  # one tensor in memory at a time
                arr = onnx.numpy_helper.to_array(init, str(src))
                inits.append(data.add(init.name, arr))
                if init.name in vectors:
                    weights.add(init.name, arr, arr.dtype.name)
            nodes = []
            for node in g.node:
                w = f"{_module(node)}.weight" if node.op_type == "MatMulNBits" else None
                if w not in targets:
                    nodes.append(node)
                    continue
                k, n = (_attr(node, a) for a in ("K", "N"))
                a, b = lora_graph.initial(lora, (k, n), targets.index(w))
                for name, arr in zip(lora_graph.names(w), (a, b), strict=True):
                    weights.add(name, arr.T, "float32", transposed=True)  # given in PyTorch's layout
                    inits.append(data.add(name, arr))
                x, y = node.input[0], node.output[0]
                node.output[0] = f"{y}/base"
                nodes += [node, *lora_graph.branch(x, node.output[0], y, w)]
        weights_sha256 = weights.close()
        params = list(weights.written.values())
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(inits)
        if lora is not None:
            g.initializer.append(onnx.numpy_helper.from_array(np.array(lora.scale, np.float32), lora_graph.SCALE))
        declare_inputs(g, params)  # inputs with initializers: overridable, so og runs the graph without them
        decoder_bytes = model.SerializeToString()
        with atomic_open(build / decoder["filename"], "wb") as f:
            f.write(decoder_bytes)  # (not onnx.checker's: the builder uses ORT's ops in ONNX's domain)
        with atomic_open(build / SCORE_GRAPH, "wb") as f:
            f.write(_scoring_graph(model, past, logits, decoder).SerializeToString())
        for p in src.iterdir():  # the config, tokenizer and processor files, as the builder wrote them
            if p.is_file() and p != graph and p not in data_files:
                shutil.copyfile(p, build / p.name)
        manifest = Manifest(
            graph=SCORE_GRAPH, weights=WEIGHTS, weights_sha256=weights_sha256, weights_bytes=weights.size,
            parameters=tuple(params), inputs=("input_ids", "attention_mask", *SCORE_INPUTS), outputs=(SCORE_OUTPUT,),
            tokenizer=tokenizer, source={"kind": "onnxruntime-genai", "location": str(src.resolve()),
                                                       "decoder": decoder["filename"]},
            base=_base(nbits, data, decoder_bytes, lora, targets))
        manifest.save(build)
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    return out


def _config(src: Path) -> dict[str, Any]:
    path = src / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        if not isinstance(decoder["filename"], str) or Path(decoder["filename"]).name != decoder["filename"]:
            raise ValueError(f"decoder filename {decoder['filename']!r} is not a file of the folder")
        for key in ("head_size", "num_key_value_heads"):
            int(decoder[key])
    except (ValueError, KeyError, TypeError) as e:
        raise OrtzoError(f"{path} is not an onnxruntime-genai decoder config ({type(e).__name__}: {e})") from None
    if "pipeline" in config["model"]["decoder"]:
        raise OrtzoError(f"{path}: a pipeline of several decoder graphs is not supported; build one graph")
    return config


def _is_past(name: str, decoder: dict[str, Any]) -> bool:
    inputs = decoder.get("inputs", {})
    templates = (inputs.get("past_key_names", "past_key_values.%d.key"),
                 inputs.get("past_value_names", "past_key_values.%d.value"))
    return any(name.startswith(t.split("%d")[0]) and name.endswith(t.split("%d")[-1]) for t in templates)


def _module(node) -> str:
    """The builder's node name as a module name: `/model/layers.0/attn/qkv_proj/MatMul_Q4` ->
    `model.layers.0.attn.qkv_proj` (the LoRA targets' globs match these)."""
    return ".".join(node.name.strip("/").split("/")[:-1]) or node.name


def _attr(node, name: str) -> Any:
    from onnx import helper

    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _scoring_graph(model, past: list[str], logits: str, decoder: dict[str, Any]):
    """The decoder without its cache (each past input an empty [batch, kv_heads, 0, head_size]
    tensor made in the graph, the present outputs dropped) and with ortzo's scoring head."""
    from onnx import TensorProto, helper

    m = copy.deepcopy(model)
    g = m.graph
    dtype = next(i.type.tensor_type.elem_type for i in g.input if i.name == past[0])
    kept = [i for i in g.input if i.name not in past]
    del g.input[:]
    g.input.extend(kept)
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in past:
                node.input[k] = EMPTY_CACHE
    e = EMPTY_CACHE
    g.initializer.extend([helper.make_tensor(f"{e}/zero", TensorProto.INT64, [1], [0]),
                          helper.make_tensor(f"{e}/dims", TensorProto.INT64, [3],
                                             [int(decoder["num_key_value_heads"]), 0, int(decoder["head_size"])])])
    cache = [
        helper.make_node("Shape", ["input_ids"], [f"{e}/ids_shape"], name=f"{e}/ids_shape"),
        helper.make_node("Gather", [f"{e}/ids_shape", f"{e}/zero"], [f"{e}/batch"], axis=0, name=f"{e}/batch"),
        helper.make_node("Concat", [f"{e}/batch", f"{e}/dims"], [f"{e}/shape"], axis=0, name=f"{e}/shape"),
        helper.make_node("ConstantOfShape", [f"{e}/shape"], [e], name=e,
                         value=helper.make_tensor(f"{e}/value", dtype, [1], [0])),
    ]
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(cache + nodes)  # first: they read only the ids and constants, and every layer reads them
    kept = [o for o in g.output if o.name == logits]
    del g.output[:]
    g.output.extend(kept)
    if logits != "logits":
        for node in g.node:
            node.output[:] = ["logits" if o == logits else o for o in node.output]
        g.output[0].name = "logits"
    add_scoring_head(g)
    _prune(g)
    return m


def _tokenizer(src: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What encoding needs, from the builder's files: the start token if the tokenizer config
    adds one, the padding id, and right padding (GroupQueryAttention's)."""
    if not (src / TOKENIZER).is_file():
        raise OrtzoError(f"{src} has no {TOKENIZER}: the model builder writes one beside the model")
    path = src / "tokenizer_config.json"
    tok = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    m = config["model"]
    bos = m.get("bos_token_id")
    pad = m.get("pad_token_id", m.get("eos_token_id", 0))
    pad = pad[0] if isinstance(pad, list) else pad
    return {"file": TOKENIZER, "add_bos": bool(tok.get("add_bos_token")) and bos is not None, "bos_id": bos,
            "pad_id": int(pad or 0), "padding_side": "right"}


def _base(nbits: dict[str, Any], data: DataFile, decoder_bytes: bytes, lora: lora_graph.LoraSpec | None,
          targets: list[str]) -> dict[str, Any]:
    """The frozen-base record (manifest.base): the builder's quantization as it is."""
    first = next(iter(nbits.values()))
    return {
        "data": BASE_DATA, "data_bytes": data.size, "data_sha256": data.sha256,
        "id": int(hashlib.sha256(decoder_bytes + data.sha256.encode()).hexdigest()[:7], 16),
        "quantize": f"int{_attr(first, 'bits')}",
        "block_size": _attr(first, "block_size"),
        "symmetric": all(len(n.input) < 4 or not n.input[3] for n in nbits.values()),
        "accuracy_level": next((a.i for a in first.attribute if a.name == "accuracy_level"), 0),
        "frozen": [{"name": n.input[1], "module": m, "k_n": [_attr(n, "K"), _attr(n, "N")],
                    "stored": f"int{_attr(n, 'bits')}"} for m, n in nbits.items()],
        "builder": "onnxruntime-genai",
        "lora": lora.to_json() | {"modules": [lora_graph.module(w) for w in targets]} if lora else None}
