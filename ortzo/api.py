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
from functools import cached_property
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .engines.ort import trainable_buffers
from .errors import OrtzoError
from .model.adapter import apply_adapter, write_adapter
from .model.manifest import Manifest, hf_config
from .model.session import ScoringSession
from .model.targets import load_target
from .model.tokenizer import Tokenizer
from .model.weights import PARAMS, WeightStore
from .optim.directions import DEFAULT_KIND
from .optim.estimators import ESTIMATORS, estimator_step
from .optim.meazo import scale_after
from .optim.mezo import StepRecord, decay_mask, step_seed
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
        return self.session.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.session.outputs

    def run(self, feeds: Feeds) -> Outputs:
        """The graph's outputs (for an exported folder: `scores`); keys of `feeds` that are
        not graph inputs (labels, say) are ignored."""
        return self.session.run(dict(feeds))

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Next-token logits [batch, seq, vocab] from the folder's full-logits graph, which
        reads the same bound weights (fine-tuned ones included): zero-copy."""
        if self._logits is None:
            if not self.manifest.logits_graph:
                raise OrtzoError(f"{self.folder} has no full-logits graph: export it again with this ortzo")
            self._logits = ScoringSession(self.folder, self.store, self.target, graph=self.manifest.logits_graph,
                                          device=self.session.device)
        ids = np.atleast_2d(np.asarray(input_ids, np.int64))
        mask = np.ones_like(ids) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask, np.int64))
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
        return next(iter(self._logits.run(feeds).values()))

    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        """Greedy continuation of `prompt` (no KV cache: one full forward per token)."""
        tok = self.tokenizer
        ids = tok.encode(prompt)
        eos = hf_config(self.folder).get("eos_token_id")
        stop = set(eos if isinstance(eos, list) else [eos]) - {None}
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
        if not (lr >= 0 and eps > 0 and n_directions >= 1 + fzoo and (clip is None or clip > 0 and not fzoo)
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

    def step(self, feeds: Feeds, loss: Callable[[Outputs], float]) -> StepRecord:
        """One step in place (MeZO's, or FZOO's): `loss` maps the graph's outputs to the number to minimise.
        A non-finite loss leaves the weights as they were and raises FloatingPointError."""
        s, n = self.settings, len(self.records)
        adapt = scale_after(r.grad for r in self.records) if s["adaptive"] == "meazo" else None
        record = estimator_step(s["estimator"], self.buffers, lambda: loss(self.run(feeds)), step=n,
                                seed=step_seed(s["seed"], n), eps=s["eps"], lr=s["lr"], directions=self.directions,
                                n_directions=s["n_directions"], clip=s["clip"], weight_decay=s["weight_decay"],
                                decay=self.decay, adapt=adapt)
        self.records.append(record)
        return record

    def fit(self, batches: Iterable[Any], loss: Callable[[Outputs, Any], float], steps: int | None = None,
            progress: bool = True) -> list[StepRecord]:
        """A step per batch (at most `steps`). A batch is a feeds dict or has `.feeds`;
        `loss(outputs, batch)` scores it. Returns the steps' records."""
        done: list[StepRecord] = []
        bar = tqdm(itertools.islice(batches, steps), total=steps, desc="mezo", unit="step", disable=not progress,
                   dynamic_ncols=True)
        for batch in bar:
            done.append(self.step(getattr(batch, "feeds", batch), lambda out, b=batch: loss(out, b)))
            bar.set_postfix(loss=f"{done[-1].loss:.4f}")
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
        return self.encoder.batch([self.encoder.encode(r) for r in rows], [r[self.task.label_field] for r in rows])

    def batches(self, rows: Rows, batch_size: int = 16, seed: int = 0) -> Iterator[Batch]:
        """Endless seeded batches over `rows`, epoch after epoch (as `ortzo finetune` draws them)."""
        for step in itertools.count():
            yield self.batch([rows[i] for i in batch_indices(len(rows), batch_size, step, seed)])

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
        return self.evaluate(rows, batch_size)["accuracy"]


def open(folder: str | Path, provider: str = "cpu", weights: str | Path | None = None,  # noqa: A001
         sha256: str | None = None) -> Model:
    """`Model(folder, provider, weights, sha256)`: the name apps call."""
    return Model(folder, provider, weights, sha256)
