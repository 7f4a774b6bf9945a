"""Classification by label-word scores: the loss MeZO minimises and the accuracy we report."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

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


def evaluate(score: Scorer, encoder: Encoder, examples: Sequence[dict], batch_size: int = 16,
             desc: str | None = None) -> dict[str, float]:
    """Accuracy and loss over `examples`, batched by length so padding stays small. With
    `desc`, a progress bar by that name shows while it runs."""
    encoded = [encoder.encode(e) for e in examples]
    labels = np.array([e[encoder.task.label_field] for e in examples], np.int64)
    order = np.argsort([len(e) for e in encoded], kind="stable")
    correct, total_loss = 0, 0.0
    starts = range(0, len(order), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=desc is None):
        idx = order[i:i + batch_size]
        b = encoder.batch([encoded[j] for j in idx], labels[idx])
        s = b.candidate_scores(score(b.feeds))
        correct += int((s.argmax(axis=1) == b.labels).sum())
        total_loss += loss(s, b.labels) * len(idx)
    return {"accuracy": correct / len(examples), "loss": total_loss / len(examples)}
