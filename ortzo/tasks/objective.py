"""Classification by label-word scores: the loss MeZO minimises and the accuracy we report."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..output import progress
from .batches import Encoder

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]


def candidate_log_softmax(scores: np.ndarray) -> np.ndarray:
    """Renormalise label-word log-probs over the candidates only."""
    s = scores.astype(np.float64)
    s -= s.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def loss(scores: np.ndarray, labels: np.ndarray) -> float:
    """Cross-entropy over the candidates, mean over the batch."""
    return float(-candidate_log_softmax(scores)[np.arange(len(labels)), labels].mean())


def label_scores(score: Scorer, encoder: Encoder, examples: Sequence[dict], batch_size: int = 16,
                 desc: str | None = None) -> np.ndarray:
    """[examples, label words] scores in the examples' order, batched by length so padding
    stays small. With `desc`, a progress bar by that name shows while it runs."""
    encoded = [encoder.encode(e) for e in examples]
    order = np.argsort([len(e) for e in encoded], kind="stable")
    out = np.zeros((len(examples), len(encoder.task.label_words)))
    starts = range(0, len(order), batch_size)
    for i in progress(starts, hide=desc is None, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        idx = order[i:i + batch_size]
        b = encoder.batch([encoded[j] for j in idx], np.zeros(len(idx), np.int64))
        out[idx] = b.candidate_scores(score(b.feeds))
    return out


def evaluate(score: Scorer, encoder: Encoder, examples: Sequence[dict], batch_size: int = 16,
             desc: str | None = None, offset: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy and loss over `examples`; with an `offset` (a `calibration`), also the
    accuracy after subtracting it."""
    s = label_scores(score, encoder, examples, batch_size, desc)
    labels = np.array([e[encoder.task.label_field] for e in examples], np.int64)
    r = {"accuracy": float((s.argmax(axis=1) == labels).mean()), "loss": loss(s, labels)}
    if offset is not None:
        r["calibrated_accuracy"] = float(((candidate_log_softmax(s) - offset).argmax(axis=1) == labels).mean())
    return r


def calibration(score: Scorer, encoder: Encoder, examples: Sequence[dict], batch_size: int = 16) -> np.ndarray:
    """Batch calibration (Zhou et al., ICLR 2024, arXiv 2309.17249): the mean over unlabeled
    examples of the label words' log-probs renormalised over the candidates. A prompt's bias
    towards one word ("always great") shows as a large mean; subtracting it before the argmax
    removes the bias without training."""
    return candidate_log_softmax(label_scores(score, encoder, examples, batch_size)).mean(axis=0)
