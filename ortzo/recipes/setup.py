"""What a run or an evaluation needs, built from its config and checked, before anything is
written: the model folder, the target, the examples, the encoder, the directions."""
from __future__ import annotations

import importlib.metadata
import logging
import platform
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..engines import open_engine
from ..engines.base import Engine, Saved
from ..errors import OrtzoError
from ..extras import missing
from ..files import sha256_file
from ..model.manifest import Manifest
from ..model.targets import Target, load_target
from ..model.tokenizer import Tokenizer
from ..model.weights import WeightStore
from ..optim.precondition import Scale, weight_rms_scales
from ..tasks.batches import Batch, Encoder
from ..tasks.data import Splits, batch_indices, make_splits
from ..tasks.task import Task

logger = logging.getLogger(__name__)

SCALES_KEY = "direction_scales"  # in a run's recorded section: parameter name -> its directions' scale
VERSIONED = ("ortzo", "numpy", "onnxruntime", "tokenizers")
TORCH_VERSIONED = ("torch", "transformers")  # what a PyTorch engine's run also depends on


@dataclass(frozen=True)
class Setup:
    cfg: RunConfig
    task: Task
    manifest: Manifest
    target: Target
    splits: Splits
    encoder: Encoder
    scales: dict[str, Scale] | None = None  # each trained parameter's direction scale, as the run recorded it

    @property
    def model_dir(self) -> Path:
        return Path(self.cfg.model)

    def load_store(self, weights: Path | None = None, sha256: str | None = None) -> WeightStore:
        """The model's weights (or a checkpoint's), checksum-checked."""
        return WeightStore.load(self.model_dir, self.manifest, weights, sha256)

    def trained(self, store: WeightStore) -> list[str]:
        """The names of the parameters the run trains (the include/exclude patterns checked)."""
        return store.select(self.cfg.include, self.cfg.exclude, vectors=self.cfg.params == "vectors")

    def engine(self, store: WeightStore, saved: Saved | None = None) -> Engine:
        """The run's engine over `store` (the model's weights, or those of the checkpoint `saved`)."""
        if self.manifest.base.get("builder") and self.cfg.engine != "ort":
            raise OrtzoError(f"--engine {self.cfg.engine} rebuilds the PyTorch model from an exported folder; "
                             f"{self.model_dir} is {self.manifest.base['builder']}'s graph (train it with --engine ort)")
        try:
            return open_engine(self.cfg, self.model_dir, store, self.trained(store), self.target, self.train_batch,
                               saved, self.scales)
        except ModuleNotFoundError as e:
            if (extra := missing(e)) is None:
                raise
            raise extra.of(f"--engine {self.cfg.engine}") from None

    @cached_property
    def train_ids(self) -> list[list[int]]:
        return [self.encoder.encode(e) for e in self.splits.train]

    @cached_property
    def train_lengths(self) -> list[int]:
        return [len(ids) for ids in self.train_ids]

    def train_batch(self, step: int) -> Batch:
        """The training batch of step `step`: a pure function of the step and the seed."""
        idx = batch_indices(len(self.splits.train), self.cfg.batch_size, step, self.cfg.seed,
                            self.train_lengths, self.cfg.group_by_length)
        return self.encoder.batch([self.train_ids[i] for i in idx],
                                  [self.splits.train[i][self.task.label_field] for i in idx])

    def with_scales(self, store: WeightStore) -> Setup:
        """This setup with the direction scales `cfg.direction_scale` picks from `store`'s
        weights (the run's start), or none."""
        if self.cfg.direction_scale == "none":
            return self
        names = self.trained(store)
        return replace(self, scales=dict(zip(names, weight_rms_scales([store.arrays[n] for n in names]))))

    def recorded(self) -> dict[str, Any]:
        """What the run is checked against when it resumes or is evaluated, and the direction
        scales its steps replay with."""
        scales = {} if self.scales is None else \
            {SCALES_KEY: {n: np.asarray(v).tolist() for n, v in self.scales.items()}}
        return {"model_weights_sha256": self.manifest.weights_sha256,
                "model_graph_sha256": sha256_file(self.model_dir / self.manifest.graph),
                **({"model_base_sha256": self.manifest.base["data_sha256"]} if self.manifest.base else {}),
                "task": self.task.to_json(), "versions": versions(self.cfg.engine)} | scales

    def check_model(self, recorded: dict[str, Any], run: Path) -> None:
        """The model folder must hold the weights and graph the run started from."""
        for key, now in (("model_weights_sha256", self.manifest.weights_sha256),
                         ("model_graph_sha256", sha256_file(self.model_dir / self.manifest.graph)),
                         ("model_base_sha256", self.manifest.base.get("data_sha256"))):
            if recorded.get(key) != now:
                what = key.split("_")[1]
                raise OrtzoError(f"{self.model_dir} holds another {what} than run {run} started from "
                                 f"(sha256 {now[:12]}..., the run recorded {str(recorded.get(key))[:12]}...); "
                                 "was it re-exported? the run needs its original model folder")


def prepare(cfg: RunConfig, task: Task, say=None, recorded: dict[str, Any] | None = None) -> Setup:
    """Check every input of `cfg` (reading the model's manifest, target, task data, tokenizer);
    for a run already started, its `recorded` section gives the direction scales."""
    model_dir = Path(cfg.model)
    manifest = Manifest.load(model_dir)
    target = load_target(cfg.target)
    if cfg.engine == "ort":
        if target.device == "cuda":
            from ..optim.cuda import CudaDirections

            CudaDirections(cfg.directions)  # a kind without a device kernel is refused here
        target.check_available()
    splits = make_splits(task, cfg.data, train_split=cfg.train_split, eval_split=cfg.eval_split,
                         train_examples=cfg.train_examples, k_shot=cfg.k_shot, eval_examples=cfg.eval_examples,
                         dev_examples=cfg.dev_examples, seed=cfg.seed)
    if splits.note:
        (say or logger.warning)(f"note: {splits.note}")
    encoder = Encoder(task, Tokenizer(model_dir, manifest.tokenizer), cfg.max_length)
    return Setup(cfg, task, manifest, target, splits, encoder, recorded_scales(cfg, recorded))


def recorded_scales(cfg: RunConfig, recorded: dict[str, Any] | None) -> dict[str, Scale] | None:
    """The direction scales a run recorded at its start (None: unscaled directions; a number per
    parameter, or a list per coordinate). A scaled run without readable scales is refused, so
    it never replays unscaled; the engine refuses scales that miss a parameter it trains."""
    if recorded is None:
        return None
    scales = recorded.get(SCALES_KEY)
    if scales is None and cfg.direction_scale == "none":
        return None
    try:
        return {str(n): np.asarray(v, np.float32) if isinstance(v, list) else float(v) for n, v in scales.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise OrtzoError(f"corrupt run config: its recorded {SCALES_KEY} ({type(e).__name__}: {e}); the run "
                         f"started with --direction-scale {cfg.direction_scale}") from None


def versions(engine: str = "ort") -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in VERSIONED + (TORCH_VERSIONED if engine != "ort" else ()):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "?"
    return found


def version_notes(recorded: dict[str, Any]) -> list[str]:
    """Differences that could make a replay inexact (a changed random generator, say)."""
    then, now = recorded.get("versions", {}), versions("torch" if "torch" in recorded.get("versions", {}) else "ort")
    return [f"note: the run started with {k} {then[k]}, this is {k} {now[k]}; its replay is exact only if the "
            "direction generator and kernels are unchanged" for k in then if k in now and k != "python"
            and then[k] != now[k]]
