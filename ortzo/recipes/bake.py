"""`ortzo bake`: a trainable folder's weights (its own, or a file `Model.save` wrote), or a
fine-tuning run's after some step, baked into a standard ONNX model (model/bake.py): an
exported causal LM with its KV cache, a prepared model as the ONNX model it came from.

A run's weights come from its newest checkpoint at or before the step and its step log's
replay, as `ortzo eval` restores them; MeZO replays from the log alone, so no task data is read.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import RECORDED, RunConfig
from ..engines.base import record_type
from ..errors import OrtzoError
from ..files import check_output_folder
from ..model.adapter import apply_adapter
from ..model.bake import MODEL, write_baked
from ..model.manifest import MANIFEST, Manifest
from ..model.targets import load_target
from ..model.tokenizer import Tokenizer
from ..model.weights import WeightStore
from ..optim import steplog
from ..run import checkpoint
from ..run.folder import RunFolder
from ..tasks.batches import Encoder
from ..tasks.data import Splits
from ..tasks.task import Task
from .setup import Setup, prepare, recorded_scales, version_notes


def bake(path: str | Path, out: str | Path, step: int | None = None, force: bool = False,
         say: Callable[[str], None] = print, adapter: str | Path | None = None,
         weights: str | Path | None = None, sha256: str | None = None) -> Manifest:
    """Bake the weights of `path` (a trainable folder, or a finetune run folder: its weights
    after `step` steps, by default all logged) into the model folder `out`; `adapter`: an
    .onnx_adapter applied over a model folder's frozen base first; `weights`: a weight file
    saved over a model folder (`Model.save`), checked against `sha256` if given. Returns the
    trainable folder's manifest."""
    path, out = Path(path), Path(out)
    check_output_folder(out, force, [path, *([Path(weights)] if weights is not None else [])], MODEL)  # before a
    # long replay
    model_folder = (path / MANIFEST).is_file()
    if adapter is not None and not model_folder:
        raise OrtzoError("--adapter applies to a model folder (a run's own tensors are its weights)")
    if weights is not None and not model_folder:
        raise OrtzoError("--weights applies to a model folder (a run's own checkpoints are its weights)")
    if weights is not None:
        if step is not None:
            raise OrtzoError("--step needs a run folder")
        folder, store = path, WeightStore.load(path, Manifest.load(path), weights, sha256)
    else:
        folder, store, _ = weights_at(path, step, say)
    if builder := store.manifest.base.get("builder"):
        raise OrtzoError(f"{folder} is {builder}'s folder: it ships as it is, with `ortzo adapter`'s file loaded "
                         "over it; bake takes folders ortzo exported or prepared from an ONNX model")
    if adapter is not None:
        apply_adapter(adapter, store, folder)
    write_baked(folder, store, out, force, reads=(path, *([Path(weights)] if weights is not None else [])), say=say)
    return store.manifest


def weights_at(path: Path, step: int | None = None,
               say: Callable[[str], None] = print) -> tuple[Path, WeightStore, list[str]]:
    """(the trainable folder, its weights, the names a run trains) of a trainable folder (all
    its names), or of a run folder after `step` steps (default: all logged), fp16 masters
    rounded in; a PyTorch engine leaves the arrays in `store.flipped` in PyTorch's layout."""
    if (path / MANIFEST).is_file():
        if step is not None:
            raise OrtzoError("--step needs a run folder")
        manifest = Manifest.load(path)
        return path, WeightStore.load(path, manifest), [p.name for p in manifest.parameters]
    run = RunFolder(path)
    if not run.holds_run():
        raise OrtzoError(f"{path} is neither a trainable model folder nor a finetune run folder")
    return _run_weights(run, step, say)


def _run_weights(run: RunFolder, step: int | None,
                 say: Callable[[str], None]) -> tuple[Path, WeightStore, list[str]]:
    """The run's weights as `ortzo eval` restores them, on the CPU target (a CUDA run's
    directions are the same on the host) and, where the engine replays from the step log
    alone (MeZO), without its examples."""
    saved = run.read_config()
    recorded = saved.pop(RECORDED)
    cfg = RunConfig.from_saved(saved | {"target": "cpu"}, f"{run.config}: ")
    try:
        task = Task.from_json(recorded["task"])
    except (KeyError, TypeError, ValueError) as e:
        raise OrtzoError(f"corrupt run config {run.config}: its task: {type(e).__name__}: {e}") from None
    log = steplog.read(run.steps, record_type(cfg.engine))
    at = len(log) if step is None else step
    if cfg.engine == "torch-bp" and at not in (0, *checkpoint.saved(run.path)):
        setup = prepare(cfg, task, say=say, recorded=recorded)  # backprop recomputes its steps from their batches
    else:
        manifest = Manifest.load(cfg.model)
        setup = Setup(cfg, task, manifest, load_target(cfg.target), Splits([], []),
                      Encoder(task, Tokenizer(cfg.model, manifest.tokenizer), cfg.max_length),
                      recorded_scales(cfg, recorded))
    setup.check_model(recorded, run.path)
    for note in version_notes(recorded):
        say(note)
    store = checkpoint.restore(run.path, log.records, at, setup.load_store, setup.engine).store
    store.sync()
    return setup.model_dir, store, setup.trained(store)


