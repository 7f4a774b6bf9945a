"""Does a model know anything about BoolQ before training? Fine-tuning for minutes can move a
prompt's bias ("always No") but cannot teach reading comprehension, so the ceiling of a short
run is set by how well the zero-shot yes-minus-no margin ranks the answers. This prints that
ranking's AUC (0.5: no signal) on N training rows and on a run's 300 held-out questions (seed
0's for a model folder), and the held-out accuracy of the best bias: fitted on the training rows
(what training a bias could reach) and the best possible on the held-out rows themselves (an
oracle, an upper bound).
Given a run folder (and a step) instead of a model folder, it asks the same of the trained
weights: did training teach a ranking, or only a bias?

usage: python experiments/boolq_signal.py TEMPLATE MAX_LENGTH N [MODEL_OR_RUN [STEP]]
"""
import json
import sys

import numpy as np

from ortzo.config import EvalOptions
from ortzo.recipes.evaluate import open_weights
from ortzo.tasks.objective import candidate_log_softmax, label_scores

template, max_length, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = sys.argv[4] if len(sys.argv) > 4 else "models/smollm2-135m"
step = int(sys.argv[5]) if len(sys.argv) > 5 else None
setup, engine, steps = open_weights(EvalOptions.build({
    "path": model, "task": "boolq", "template": template, "data": "../shared/data/boolq", "max_length": max_length,
    "eval_examples": 300, "eval_batch_size": 32, "step": step}))  # seed: a run's own, else 0
cfg = setup.cfg


def margins(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """log p(yes) - log p(no), renormalised over the two words, and the labels (1: yes)."""
    s = candidate_log_softmax(label_scores(engine.score, setup.encoder, rows, cfg.eval_batch_size, desc="score"))
    return s[:, 1] - s[:, 0], np.array([r[setup.task.label_field] for r in rows])


def auc(m: np.ndarray, y: np.ndarray) -> float:
    """P(a yes-question's margin > a no-question's), ties counted half."""
    pos, neg = m[y == 1], m[y == 0]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


train, y_train = margins(setup.splits.train[:n])
held, y_held = margins(setup.splits.eval)
candidates = np.sort(train)
fit = [((train > t) == y_train).mean() for t in candidates]
bias = candidates[int(np.argmax(fit))]
print(json.dumps({"model": model, "steps": steps, "template": template, "max_length": max_length,
                  "auc_train": auc(train, y_train), "auc_eval": auc(held, y_held),
                  "eval_majority": float(max(y_held.mean(), 1 - y_held.mean())),
                  "eval_accuracy": float(((held > 0) == y_held).mean()),  # the margin's sign: zero-shot for a model
                  "eval_fitted_threshold": float(((held > bias) == y_held).mean()), "train_best": float(max(fit)),
                  "eval_oracle_threshold": float(max(((held > u) == y_held).mean() for u in np.sort(held)))}))
