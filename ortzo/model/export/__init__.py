"""`ortzo export`: a Hugging Face causal LM -> a trainable model folder.

Stages: resolve the source (sources), load it as safetensors (GGUF dequantized to fp32),
trace the graph with Optimum (trace), write the tokenizer (tokenizer), then the ortzo pass
(convert): PyTorch names, tied weights one buffer, weights to named inputs and one flat
file, the scoring head (head), the Hugging Face config; then the full-logits graph
(model.logits). The folder is built beside `out` and renamed into place.

Needs the `export` extra (torch, optimum-onnx, transformers); the runtime never imports this.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ...errors import OrtzoError
from ..manifest import Manifest
from ..mobile import add_ort_graph
from .convert import convert
from .sources import load_to_folder, resolve
from .tokenizer import export_tokenizer
from .trace import optimum_export

__all__ = ["export_model"]

STAGES = 4


def export_model(model: str, out: str | Path, opset: int = 17, force: bool = False, dtype: str = "float32",
                 verbose: bool = False, say: Callable[[str], None] = print, graph_format: str = "onnx") -> Manifest:
    """Export `model` into the trainable folder `out`, atomically (built beside it, then
    renamed). Prints its stages through `say`; third-party output and warnings are hidden
    unless `verbose`. `graph_format` "ort" adds the graph in ORT format (mobile targets)."""
    out = Path(out)
    if dtype not in ("float32", "float16"):
        raise OrtzoError(f"unsupported dtype {dtype!r}; choose float32 or float16")
    if graph_format not in ("onnx", "ort"):
        raise OrtzoError(f"unsupported graph format {graph_format!r}; choose onnx or ort")
    stages = STAGES + (graph_format == "ort")
    if out.exists() and not out.is_dir():
        raise OrtzoError(f"{out} is a file")
    if out.exists() and any(out.iterdir()) and not force:
        raise OrtzoError(f"{out} exists and is not empty; pass --force to replace it")
    quiet = _quiet if not verbose else nullcontext
    source = resolve(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp") as tmp:
        tmp = Path(tmp)
        what = "dequantizing the GGUF to fp32" if source.kind == "gguf" else "reading the weights"
        with _stage(say, stages, 1, f"loading {source.location} ({what})"), quiet():
            hf_dir = load_to_folder(source, tmp / "hf")
        with _stage(say, stages, 2, f"tracing the graph with Optimum (opset {opset})"), quiet():
            graph = optimum_export(hf_dir, tmp / "onnx", opset)
        build = tmp / "trainable"
        build.mkdir()
        with _stage(say, stages, 3, "writing the tokenizer"), quiet():
            tok = export_tokenizer(source, hf_dir, build)
        with _stage(say, stages, 4, f"moving the weights to inputs ({dtype}) and adding the scoring head"), quiet():
            manifest = convert(graph, hf_dir, build, tok, dtype=dtype,
                               source={"model": model, "kind": source.kind, "location": source.location})
            from ..logits import write_logits_graph  # here: model.logits imports this package's head

            manifest = write_logits_graph(build)
        if graph_format == "ort":
            with _stage(say, stages, 5, "converting the graph to ORT format (onnxruntime's converter)"), quiet():
                manifest = add_ort_graph(build, manifest)
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    return manifest


@contextmanager
def _stage(say: Callable[[str], None], stages: int, n: int, text: str) -> Iterator[None]:
    say(f"[{n}/{stages}] {text} ...")
    t = time.perf_counter()
    yield
    say(f"[{n}/{stages}] done in {time.perf_counter() - t:.1f} s")


@contextmanager
def _quiet() -> Iterator[None]:
    """Hide what the exporters print (warnings, logs, progress bars, C++ messages): file
    descriptors 1 and 2 go to /dev/null. A failure still raises; --verbose shows it all."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    logging.disable(logging.WARNING)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except OrtzoError:
        raise
    except Exception as e:
        raise OrtzoError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                         "(run again with --verbose to see the exporters' output)") from e
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
        logging.disable(logging.NOTSET)
