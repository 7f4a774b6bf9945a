"""`ortzo prepare`: bring your own ONNX model. Any tool's export (Optimum's text-classification
export of a BERT, say) becomes a trainable model folder, so that ortzo fine-tunes the model an
app already ships instead of one it exports itself. An onnxruntime-genai folder (the model
builder's int4 decoder with its KV cache) is model/genai.py's.

Which initializers become parameters: every initializer of the main graph that is a float32 or
float16 tensor with at least two elements. Those are what an exporter stores weights as
(embeddings, matrices, biases, norms); the rest are graph constants and stay in the graph:
integer tensors (shapes, indices, position ids), scalars and one-element tensors (the 1/sqrt(d)
of attention, a LayerNorm epsilon), other float types, Constant nodes and subgraph
initializers. Nothing is renamed (an Optimum BERT keeps `bert.encoder.layer.0...` for norms
and biases, `onnx::MatMul_N` for matrices its exporter pre-transposed), nothing is
transposed or cast, and an initializer shared by several nodes stays one parameter. Which of
them train is the caller's choice (include/exclude patterns).

The input model is only read; the folder is built beside `out` and renamed into place.
Needs `onnx` (the `onnx` extra); the runtime never imports this module's dependencies.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OrtzoError
from ..files import atomic_open, check_output_folder
from .manifest import MANIFEST, Manifest, Parameter

if TYPE_CHECKING:
    from .lora import LoraSpec
    from .quantize import QuantSpec

TOKENIZER = "tokenizer.json"
FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT and FLOAT16: the manifest's dtypes
MIN_ELEMENTS = 2


def prepare(onnx_path: str | Path, out: str | Path, tokenizer: str | Path | None = None,
            force: bool = False, quant: QuantSpec | None = None, lora: LoraSpec | None = None) -> Path:
    """Turn the ONNX model `onnx_path` (or an onnxruntime-genai folder) into the trainable folder
    `out` (see the module's rule); copy `tokenizer` (default: a tokenizer.json beside the model)
    if there is one; with `quant` or `lora`, freeze its base (model/frozen.py). Returns `out`."""
    import onnx

    from .export.convert import GRAPH, WEIGHTS
    from .genai import is_genai_folder, prepare_genai

    src, out = Path(onnx_path), Path(out)
    if is_genai_folder(src):
        if quant is not None:
            raise OrtzoError(f"{src} is an onnxruntime-genai folder, quantized by its builder already: drop --quantize")
        if tokenizer is not None:
            raise OrtzoError(f"{src} is an onnxruntime-genai folder with its own tokenizer: drop --tokenizer")
        return prepare_genai(src, out, lora, force)
    model = _load(src)
    g = model.graph
    names = {i.name: i.name for i in g.initializer if _is_parameter(i)}
    if not names:
        raise OrtzoError(f"{src} has no trainable initializer (a float32 or float16 tensor of at least "
                         f"{MIN_ELEMENTS} elements): its weights are constants or graph inputs already")
    tok = _tokenizer_file(src, tokenizer)
    check_output_folder(out, force, [src, *_external_files(g, src.parent), *([tok] if tok else [])], MANIFEST)
    # An initializer also declared as an input (older IRs) becomes one input: the parameter's.
    kept = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(kept)
    constants = {i.name for i in g.initializer} - set(names)
    data_inputs = tuple(i.name for i in kept if i.name not in constants)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp") as tmp:
        build = Path(tmp) / "trainable"
        build.mkdir()
        params, sha256, size = _weights_to_inputs(model, names, build / WEIGHTS, src.parent)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise OrtzoError(f"{src}: the graph with its weights as inputs is not valid ONNX: "
                             f"{str(e).splitlines()[0]}") from None
        with atomic_open(build / GRAPH, "wb") as f:
            f.write(model.SerializeToString())
        if tok:
            shutil.copyfile(tok, build / TOKENIZER)
        manifest = Manifest(graph=GRAPH, weights=WEIGHTS, weights_sha256=sha256, weights_bytes=size,
                            parameters=tuple(params), inputs=data_inputs,
                            outputs=tuple(o.name for o in g.output), tokenizer={"file": TOKENIZER} if tok else {},
                            source={"kind": "onnx", "location": str(src.resolve()),
                                    "producer": f"{model.producer_name} {model.producer_version}".strip()})
        manifest.save(build)
        if quant is not None or lora is not None:
            from .frozen import freeze

            freeze(build, Path(tmp) / "frozen", quant, lora)
            build = Path(tmp) / "frozen"
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    return out


def _weights_to_inputs(model, names: dict[str, str], path: Path, base: Path) -> tuple[list[Parameter], str, int]:
    """Move the initializers `names` maps (initializer name -> parameter name) out of `model`
    into the flat weight file `path` and make them graph inputs under their parameter names.

    Streamed in graph order, one tensor in memory at a time, each in its own dtype. What stays
    external (`base` is its folder) is small and is pulled into the graph. Returns the
    parameters, the file's sha256 and its size."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    from .export.convert import declare_inputs, rename_inputs
    from .export.flatfile import FlatWriter

    g = model.graph
    keep = []
    writer = FlatWriter(path)
    for init in g.initializer:
        if init.name not in names:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init, str(base))
        writer.add(names[init.name], arr, arr.dtype.name)
        del arr
    sha256 = writer.close()
    del g.initializer[:]
    g.initializer.extend(keep)
    load_external_data_for_model(model, str(base))
    rename_inputs(g, names)
    params = list(writer.written.values())
    declare_inputs(g, params)
    return params, sha256, writer.size


def _is_parameter(init) -> bool:
    n = 1
    for d in init.dims:
        n *= d
    return init.data_type in FLOAT_TYPES and n >= MIN_ELEMENTS


def _load(src: Path):
    """The model's graph and initializer headers; external tensor data is read later, one at a time."""
    import onnx

    if not src.is_file():
        raise OrtzoError(f"ONNX model not found: {src}")
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and whatever else a wrong file raises
        raise OrtzoError(f"{src} is not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node or not model.opset_import:  # protobuf parses some non-ONNX bytes as empty
        raise OrtzoError(f"{src} is not an ONNX model (no graph)")
    return model


def _external_files(g, base: Path) -> set[Path]:
    """The external data files the initializers read, each checked to exist before anything is written."""
    from onnx.external_data_helper import uses_external_data

    files = set()
    for init in g.initializer:
        if uses_external_data(init):
            path = base / next(e.value for e in init.external_data if e.key == "location")
            if not path.is_file():
                raise OrtzoError(f"{init.name}'s external data file is missing: {path}")
            files.add(path)
    return files


def _tokenizer_file(src: Path, given: str | Path | None) -> Path | None:
    """The tokenizer to copy, checked to load: the one given, else tokenizer.json beside the model."""
    from tokenizers import Tokenizer

    path = Path(given) if given is not None else src.parent / TOKENIZER
    if given is None and not path.is_file():
        return None
    if not path.is_file():
        raise OrtzoError(f"tokenizer not found: {path}")
    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for a bad file
        raise OrtzoError(f"{path} is not a tokenizers tokenizer.json: {str(e).splitlines()[0]}") from None
    return path
