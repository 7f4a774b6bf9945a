"""`ortzo export`: a Hugging Face causal LM -> a trainable model folder, in memory that does
not grow with the model.

Stages: open the source (sources: its config and a reader of its tensors, tensors), trace the
graph with Optimum on placeholder weights (trace), write the tokenizer (tokenizer), then the
ortzo pass (convert): the weights streamed one at a time from the source files into one flat
file under their PyTorch names, tied weights one buffer, the scoring head (head), the Hugging
Face config; then the full-logits graph (model.logits).

The folder is built in `.NAME.partial` beside `out` and renamed into place when whole. An
export that dies (killed, out of disk) leaves that folder; running the same export again
resumes it: the traced graph is kept and the weight file goes on from its last whole tensor.
A different request (model, dtype, opset, format, base) starts it afresh. With a quantized
base or LoRA, the whole trainable folder is then frozen (model/frozen.py): the matrices become
constants, int4/int8 if asked, and only the vectors and LoRA stay trainable.

Needs the `export` extra (torch, optimum-onnx, transformers); the runtime never imports this.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

from ...errors import OrtzoError
from ...extras import require
from ...files import check_output_folder
from ...output import progress, silenced
from ..lora import LoraSpec, targeted
from ..manifest import MANIFEST, Manifest
from ..mobile import add_ort_graph
from ..quantize import QuantSpec
from .convert import convert
from .sources import Source, open_checkpoint, resolve
from .tensors import GGUFTensors
from .tokenizer import export_tokenizer
from .trace import GRAPH, trace_graph

__all__ = ["export_model", "partial_folder"]

STAGES = 4
REQUEST = "request.json"
TRACED = "traced"  # the trace's folder inside the partial one, whole once the graph is in it
# The loggers of the libraries an export runs, quiet but for errors unless --verbose.
EXPORTERS = ("torch", "transformers", "optimum", "onnx", "onnxscript", "onnx_ir", "accelerate", "huggingface_hub")
logger = logging.getLogger(__name__)


def partial_folder(out: Path) -> Path:
    """Where the export of `out` is built (and left, to resume, if it dies)."""
    return out.parent / f".{out.name}.partial"


def export_model(model: str, out: str | Path, opset: int = 17, force: bool = False, dtype: str = "float32",
                 verbose: bool = False, say: Callable[[str], None] = logger.info, graph_format: str = "onnx",
                 quant: QuantSpec | None = None, lora: LoraSpec | None = None) -> Manifest:
    """Export `model` into the trainable folder `out`, atomically (built beside it, then
    renamed) and resumably. Says its stages through `say` (default: the `ortzo` logger);
    third-party output and warnings are hidden unless `verbose`. `graph_format` "ort" adds the graph in ORT format (mobile).
    `quant` or `lora`: a frozen base (model/frozen.py)."""
    from filelock import FileLock, Timeout

    require("export", "ortzo export")  # before anything is written
    out = Path(out)
    if dtype not in ("float32", "float16"):
        raise OrtzoError(f"unsupported dtype {dtype!r}; choose float32 or float16")
    if graph_format not in ("onnx", "ort"):
        raise OrtzoError(f"unsupported graph format {graph_format!r}; choose onnx or ort")
    source = resolve(model)
    check_output_folder(out, force, [Path(source.location)] if source.kind in ("dir", "gguf") else [], MANIFEST)
    quiet = _quiet if not verbose else nullcontext
    out.parent.mkdir(parents=True, exist_ok=True)
    work = partial_folder(out)
    lock_file = work.with_name(work.name + ".lock")
    try:
        lock = FileLock(str(lock_file), timeout=0).acquire()
    except Timeout:
        raise OrtzoError(f"another export into {out} is running") from None
    with lock:
        try:
            manifest = _build(model, source, out, work, opset, dtype, graph_format, say, quiet, quant, lora)
        except BaseException as e:
            if isinstance(e, OrtzoError) and not (work / TRACED).is_dir():  # refused before any work worth resuming
                shutil.rmtree(work, ignore_errors=True)
                lock_file.unlink(missing_ok=True)
            elif work.is_dir():
                say(f"the partial export stays in {work}: the same command resumes it (or delete it)")
            raise
    lock_file.unlink(missing_ok=True)
    return manifest


def _build(model: str, source: Source, out: Path, work: Path, opset: int, dtype: str, graph_format: str,
           say: Callable[[str], None], quiet: Callable[[], Any], quant: QuantSpec | None,
           lora: LoraSpec | None) -> Manifest:
    """The export's stages in `work`, then `out` replaced by its result."""
    frozen = quant is not None or lora is not None
    stages = STAGES + (graph_format == "ort") + frozen
    _start_or_resume(work, {"model": model, "location": source.location, "dtype": dtype, "opset": opset,
                            "graph_format": graph_format, "quantize": quant and quant.to_json(),
                            "lora": lora and lora.to_json()}, say)
    with _stage(say, stages, 1, f"opening {source.location} (config and tensor index; no weights)"), quiet():
        ckpt = open_checkpoint(source)
        stored_bits = ckpt.tensors.stored_bits() if isinstance(ckpt.tensors, GGUFTensors) else None
        if quant is not None:
            quant.widths([], stored_bits)  # --widths source of a source without widths fails now, not after it
        if lora is not None:  # a mistyped target fails now, not after the export
            from .names import torch_parameters

            targeted(lora, [n for n, s in torch_parameters(ckpt.config).shapes.items() if len(s) == 2])
    traced = work / TRACED
    if not (traced / GRAPH).is_file():
        with _stage(say, stages, 2, f"tracing the graph with Optimum on placeholder weights (opset {opset})"), \
                quiet():
            shutil.rmtree(work / f"{TRACED}.tmp", ignore_errors=True)
            trace_graph(ckpt.config, work / f"{TRACED}.tmp", opset)
            os.replace(work / f"{TRACED}.tmp", traced)
    else:
        say(f"[2/{stages}] the graph traced before is kept")
    build = work / "trainable"
    build.mkdir(exist_ok=True)
    with _stage(say, stages, 3, "writing the tokenizer"), quiet():
        tok = export_tokenizer(source, ckpt.folder, build)
    with _stage(say, stages, 4, f"streaming the weights into the folder ({dtype}), adding the scoring head"), \
            quiet() as terminal:
        manifest = convert(traced / GRAPH, ckpt.config, ckpt.tensors, build, tok, dtype=dtype,
                           source={"model": model, "kind": source.kind, "location": source.location},
                           progress=lambda items, total: _progress(items, total, terminal))
        from ..logits import write_logits_graph  # here: model.logits imports this package's head

        manifest = write_logits_graph(build)
    if frozen:
        what = " and ".join(([f"{quant.name} (block {quant.block_size})"] if quant else []) +
                            ([f"LoRA r={lora.r} on {', '.join(lora.targets)}"] if lora else []))
        with _stage(say, stages, 5, f"freezing the matrices: {what}; vectors and LoRA stay trainable"), quiet():
            from ..frozen import freeze  # here: model.frozen imports model.logits, which imports this package

            shutil.rmtree(work / "frozen", ignore_errors=True)
            manifest = freeze(build, work / "frozen", quant, lora, stored_bits)
            shutil.rmtree(build)
            build = work / "frozen"
    if graph_format == "ort":  # of the graph the folder trains: the frozen base's, where there is one
        with _stage(say, stages, stages, "converting the graph to ORT format (onnxruntime's converter)"), quiet():
            manifest = add_ort_graph(build, manifest)
    if out.exists():
        shutil.rmtree(out)
    build.rename(out)
    shutil.rmtree(work)
    return manifest


def _start_or_resume(work: Path, request: dict[str, Any], say: Callable[[str], None]) -> None:
    """Keep a partial export of the same request; anything else in its place is removed."""
    try:
        same = json.loads((work / REQUEST).read_text()) == request
    except (OSError, ValueError):
        same = False
    if same:
        say(f"resuming the export left in {work}")
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / REQUEST).write_text(json.dumps(request))


def _progress(items: Iterable[Any], total: int, terminal: IO[str] | None) -> Iterable[Any]:
    """A progress bar on the terminal's stderr (quiet stages send file descriptor 2 elsewhere)."""
    return progress(items, total=total, desc="weights", unit="tensor", file=terminal, leave=False)


@contextmanager
def _stage(say: Callable[[str], None], stages: int, n: int, text: str) -> Iterator[None]:
    say(f"[{n}/{stages}] {text} ...")
    t = time.perf_counter()
    yield
    say(f"[{n}/{stages}] done in {time.perf_counter() - t:.1f} s")


@contextmanager
def _quiet() -> Iterator[IO[str]]:
    """Hide what the exporters print (warnings, logs, progress bars, C++ messages): file
    descriptors 1 and 2 go to /dev/null. Yields the terminal's stderr, for ortzo's own
    progress. A failure still raises; --verbose shows it all."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with warnings.catch_warnings(), open(saved[1], "w", closefd=False) as terminal, \
                silenced(*EXPORTERS, level=logging.ERROR):
            warnings.simplefilter("ignore")
            yield terminal
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
