"""The API for apps that already run ONNX Runtime: open a trainable folder, serve it, fine-tune
it in place, save it. Importable as `ortzo.open`, `ortzo.Model`.

One `Model` is one weight store bound once into the session (and into the full-logits
session, when an app generates text): inference and MeZO steps read and change the same
buffers, so fine-tuning costs what inference costs in memory. A step is
`optim.estimators.estimator_step` (MeZO's or FZOO's), its records replay exactly
(`optim.mezo.replay`), as in `ortzo finetune`.
"""
from __future__ import annotations

import itertools
import math
import time
from functools import cached_property
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
from .engines.ort import trainable_buffers
from .errors import OrtzoError
from .output import progress as progress_bar
from .model.adapter import apply_adapter, write_adapter
from .model.manifest import Manifest, hf_config
from .model.session import ScoringSession
from .model.targets import load_target
from .model.tokenizer import Tokenizer
from .model.weights import PARAMS, WeightStore
from .optim.directions import DEFAULT_KIND
from .optim.estimators import ESTIMATORS, estimator_step
from .optim.meazo import scale_after
from .optim.mezo import EPS_MAX, LR_MAX, SCHEDULES, StepRecord, decay_mask, scheduled_lr, step_seed, zero_step
from .tasks.batches import Batch, Encoder
from .tasks.data import Rows, batch_indices
from .tasks.objective import evaluate, loss as label_loss
from .tasks.task import Task, load_task

Feeds = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class Model:
    """A trainable folder open on an execution-provider target (`provider`: a name in
    targets/ or a .toml file); `weights`: another weight file of the same model (a
    checkpoint's, a saved one), checked against `sha256` if given."""

    def __init__(self, folder: str | Path, provider: str = "cpu", weights: str | Path | None = None,
                 sha256: str | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.target = load_target(provider)
        self.target.check_available()
        self.store = WeightStore.load(self.folder, self.manifest, weights, sha256)
        self.session = ScoringSession(self.folder, self.store, self.target)
        self._logits: ScoringSession | None = None
        self.records: list[StepRecord] = []
        self.train()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The graph inputs a caller feeds (the weights are bound already)."""
        return self.session.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        """The names of what `run` returns."""
        return self.session.outputs

    def run(self, feeds: Feeds) -> Outputs:
        """The graph's outputs (for an exported folder: `scores`); keys of `feeds` that are
        not graph inputs (labels, say) are ignored."""
        return self.session.run(dict(feeds))

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Next-token logits [batch, seq, vocab] from the folder's full-logits graph, which
        reads the same bound weights (fine-tuned ones included): zero-copy."""
        if self._logits is None:
            if self.manifest.logits_graph:
                self._logits = ScoringSession(self.folder, self.store, self.target, graph=self.manifest.logits_graph,
                                              device=self.session.device)
            elif "logits" in self.outputs:  # a prepared causal LM: its own graph computes them
                self._logits = self.session
            elif self.manifest.source.get("kind") == "onnx":
                raise OrtzoError(f"{self.folder}'s graph (from `ortzo prepare`) has no `logits` output: "
                                 f"it serves `run` only (outputs: {', '.join(self.outputs)})")
            else:
                raise OrtzoError(f"{self.folder} has no full-logits graph: export it again with this ortzo")
        ids = np.atleast_2d(np.asarray(input_ids, np.int64))
        mask = np.ones_like(ids) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask, np.int64))
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
        out = self._logits.run(feeds)
        return out["logits"] if "logits" in out else next(iter(out.values()))

    def generate(self, prompt: str, max_new_tokens: int = 20, eos_token_id: int | Sequence[int] | None = None) -> str:
        """Greedy continuation of `prompt` (no KV cache: one full forward per token), ended by
        `eos_token_id` (default: the exported model's config's; a prepared folder has none)."""
        tok = self.tokenizer
        ids = tok.encode(prompt)
        eos = eos_token_id if eos_token_id is not None or self.manifest.source.get("kind") == "onnx" else \
            hf_config(self.folder).get("eos_token_id")
        stop = set(eos if isinstance(eos, Sequence) else [eos]) - {None}
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(np.array([ids + new]))[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
        return tok.decode(new)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """Read once: `generate` and every `classifier` share it."""
        return Tokenizer(self.folder, self.manifest.tokenizer)

    def train(self, include: Sequence[str] = ("*",), exclude: Sequence[str] = (), *, lr: float = 1e-5,
              eps: float = 1e-3, directions: str = DEFAULT_KIND, seed: int = 0, clip: float | None = None,
              weight_decay: float = 0.0, n_directions: int = 1, estimator: str = "mezo",
              params: str = "all", adaptive: str = "none") -> Model:
        """What the next steps train (parameter-name globs, among all parameters or, with params="vectors",
        the one-dimensional ones) and how (`estimator`: "mezo", or "fzoo" with n_directions >= 2 and no
        clip; `adaptive`: "meazo" for MEAZO's step size, mezo only); returns the model."""
        fzoo = estimator == "fzoo"
        if not (0 <= lr <= LR_MAX and 0 < eps <= EPS_MAX and 0 <= weight_decay < math.inf and n_directions >= 1 + fzoo
                and (clip is None or clip > 0 and not fzoo)
                and estimator in ESTIMATORS and params in PARAMS and adaptive in ("none", "meazo")
                and not (fzoo and adaptive == "meazo")):
            raise OrtzoError(f"bad settings: estimator={estimator}, lr={lr}, eps={eps}, clip={clip}, "
                             f"n_directions={n_directions}, params={params}, adaptive={adaptive}")
        self.names = self.store.select(include, exclude, vectors=params == "vectors")
        self.buffers, self.directions = trainable_buffers(self.session, self.names, directions,
                                                          self.target.direction_threads)
        self.decay = decay_mask(self.buffers)
        self.settings = dict(lr=lr, eps=eps, seed=seed, clip=clip, weight_decay=weight_decay,
                             n_directions=n_directions, estimator=estimator, adaptive=adaptive)
        return self

    def step(self, feeds: Feeds, loss: Callable[[Outputs], float], lr: float | None = None) -> StepRecord:
        """One step in place (MeZO's, or FZOO's): `loss` maps the graph's outputs to the number to minimise;
        `lr` overrides `train`'s for this step (a schedule's value). A step that fails (a non-finite
        loss raises FloatingPointError; `loss` may raise) is finished as a zero step, its
        perturbations undone by the arithmetic its replay repeats: it joins `records` (lr 0, no
        losses), which still replay to the weights bit for bit, and the error is raised."""
        if lr is not None and not 0 <= lr <= LR_MAX:
            raise OrtzoError(f"step(lr={lr}): the lr is between 0 and {LR_MAX:g}")
        s, n = self.settings, len(self.records)
        adapt = scale_after(r.grad for r in self.records if math.isfinite(r.loss)) \
            if s["adaptive"] == "meazo" else None  # a zero step (a failed one) is no estimate
        seed = step_seed(s["seed"], n)
        try:
            record = estimator_step(s["estimator"], self.buffers, lambda: loss(self.run(feeds)), step=n, seed=seed,
                                    eps=s["eps"], lr=s["lr"] if lr is None else lr, directions=self.directions,
                                    n_directions=s["n_directions"], clip=s["clip"], weight_decay=s["weight_decay"],
                                    decay=self.decay, adapt=adapt)
        except BaseException:  # the estimator finished the step as a zero step: the records still replay
            self.records.append(zero_step(n, seed, s["n_directions"], s["eps"], s["weight_decay"], s["estimator"]))
            raise
        self.records.append(record)
        return record

    def fit(self, batches: Iterable[Any], loss: Callable[[Outputs, Any], float], steps: int | None = None, *,
            epochs: int | None = None, time_budget: float | None = None, schedule: str = "constant",
            progress: bool = True) -> list[StepRecord]:
        """A step per batch until `steps`, `epochs` (passes over a sized `batches`: a list, or
        `Classifier.batches`, whose length is one epoch) or `time_budget` (seconds of steps: it
        ends after the step that reaches it) runs out, or `batches` does. A batch is a feeds dict
        or has `.feeds`; `loss(outputs, batch)` scores it. `schedule` is the CLI's: "constant",
        or "linear"/"wsd" decaying to 0 at the end of this call, by steps or by time as the CLI
        does. Returns this call's records.

        `ortzo finetune`'s default recipe from Python: `train(params="vectors", lr=2e-4,
        clip=30)` then `fit(clf.batches(rows, 16), clf.loss, steps=N, schedule="linear")`."""
        if steps is not None and epochs is not None:
            raise OrtzoError("fit takes steps or epochs, not both")
        if epochs is not None:
            if not isinstance(batches, Sized) or epochs < 1:
                raise OrtzoError(f"fit(epochs={epochs}) needs a sized `batches` (a list, or Classifier.batches) "
                                 "and epochs >= 1")
            steps = epochs * len(batches)
            batches = batches if isinstance(batches, Iterator) else itertools.chain.from_iterable(
                itertools.repeat(batches, epochs))
        if steps is None and time_budget is None and getattr(batches, "endless", False):
            raise OrtzoError("these batches never end: give fit steps=, epochs= or time_budget=")
        total = steps if steps is not None else (len(batches) if isinstance(batches, Sized) else None)
        if schedule not in SCHEDULES or schedule != "constant" and total is None and time_budget is None:
            raise OrtzoError(f"schedule={schedule!r}: choose {', '.join(SCHEDULES)}; a decaying one needs "
                             "steps=, epochs=, time_budget= or sized batches to end at")
        done: list[StepRecord] = []
        seconds = 0.0
        bar = progress_bar(itertools.islice(batches, steps), hide=not progress, total=total, desc="mezo", unit="step",
                           dynamic_ncols=True)
        for batch in bar:
            lr = scheduled_lr(self.settings["lr"], schedule, len(done), total, seconds, time_budget)
            t0 = time.perf_counter()
            done.append(self.step(getattr(batch, "feeds", batch), lambda out, b=batch: loss(out, b), lr))
            seconds += time.perf_counter() - t0
            bar.set_postfix(loss=f"{done[-1].loss:.4f}")
            if time_budget is not None and seconds >= time_budget:
                break
        return done

    def save(self, path: str | Path) -> str:
        """The weights in the folder's layout, atomically; returns the file's sha256 (a
        `weights`/`sha256` pair for `ortzo.open`, or for `restore`)."""
        return self.store.save(path)

    def restore(self, path: str | Path, sha256: str | None = None) -> None:
        """Load a saved weight file into the bound buffers (checked before anything changes)."""
        self.store.reload(path, sha256)
        if self.session.device is not None:
            self.session.device.upload()

    def save_adapter(self, path: str | Path) -> int:
        """The trained tensors (those `train` chose: by default every trainable one) of a frozen
        base as an ONNX Runtime adapter (`.onnx_adapter`), atomically; returns its bytes. Plain
        ORT applies it over the unchanged base with `RunOptions.add_active_adapter`."""
        if self.session.device is not None:
            self.session.device.download()
        self.store.sync()
        return write_adapter(path, self.manifest, self.folder, {n: self.store.arrays[n] for n in self.names})

    def load_adapter(self, path: str | Path) -> None:
        """Set the bound tensors to an adapter's (checked to be for this base before anything
        changes): the model then serves, or goes on training from, the adapter's weights."""
        apply_adapter(path, self.store, self.folder)
        if self.session.device is not None:
            self.session.device.upload()

    def classifier(self, task: str | Task = "sst2", template: str | None = None, max_length: int = 256) -> Classifier:
        """Label-word classification with a task's prompts (a built-in name, with one of its
        named templates, a .toml spec or a Task)."""
        return Classifier(self, load_task(task, template) if isinstance(task, str) else task, max_length)


class Classifier:
    """A task's prompts and label words over a `Model`: batches, the loss, predictions."""

    def __init__(self, model: Model, task: Task, max_length: int = 256) -> None:
        self.model, self.task = model, task
        self.encoder = Encoder(task, model.tokenizer, max_length)

    def batch(self, rows: Rows) -> Batch:
        """`rows` as one batch: the prompts' feeds, the label words to score, the labels."""
        return self.encoder.batch([self.encoder.encode(r) for r in rows], [r[self.task.label_field] for r in rows])

    def batches(self, rows: Rows, batch_size: int = 16, seed: int = 0) -> Batches:
        """Endless seeded batches over `rows`, epoch after epoch, as `ortzo finetune` draws them
        (an iterator: a second `fit` goes on where the first stopped); its length is one epoch."""
        if not 1 <= batch_size <= len(rows):
            raise OrtzoError(f"batch_size {batch_size} must be between 1 and the {len(rows)} rows")
        return Batches(self, rows, batch_size, seed)

    def loss(self, outputs: Outputs, batch: Batch) -> float:
        """Cross-entropy over the label words, the batch's mean."""
        return label_loss(batch.candidate_scores(outputs["scores"]), batch.labels)

    def predict(self, rows: Rows) -> np.ndarray:
        """The label of each row: the label word the model scores highest."""
        batch = self.batch(rows)
        return batch.candidate_scores(self.model.run(batch.feeds)["scores"]).argmax(axis=1)

    def evaluate(self, rows: Rows, batch_size: int = 16) -> dict[str, float]:
        """Accuracy and mean loss over `rows` (batched by length, as `ortzo eval` does)."""
        return evaluate(lambda feeds: self.model.run(feeds)["scores"], self.encoder, rows, batch_size)

    def accuracy(self, rows: Rows, batch_size: int = 16) -> float:
        """The share of `rows` whose label `predict` gets right."""
        return self.evaluate(rows, batch_size)["accuracy"]


class Batches(Iterator[Batch]):
    """`Classifier.batches`: step k's batch is `batch_indices(len(rows), batch_size, k, seed)`,
    a pure function of k, so a resumed app draws what it would have drawn."""

    endless = True

    def __init__(self, classifier: Classifier, rows: Rows, batch_size: int, seed: int) -> None:
        self.classifier, self.rows, self.batch_size, self.seed = classifier, rows, batch_size, seed
        self.step = 0

    def __len__(self) -> int:
        return max(1, len(self.rows) // self.batch_size)

    def __next__(self) -> Batch:
        picked = batch_indices(len(self.rows), self.batch_size, self.step, self.seed)
        self.step += 1
        return self.classifier.batch([self.rows[i] for i in picked])


def open(folder: str | Path, provider: str = "cpu", weights: str | Path | None = None,  # noqa: A001
         sha256: str | None = None) -> Model:
    """`Model(folder, provider, weights, sha256)`: the name apps call."""
    return Model(folder, provider, weights, sha256)
