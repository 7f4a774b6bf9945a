"""Inference's peak RSS on a run's own inputs, to set beside the run's peak: the same
evaluation a run starts with (every evaluation row, sorted by length), then one forward on each
of the first STEPS training batches the run draws (the same seed, so the same rows and shapes),
then the evaluation again, as a run ends: the same inputs in the same order, through a plain
inference session, nothing perturbed, nothing trained. The run's metrics give its peak RSS at
each evaluation; the ratio of the two is the fine-tuning cost in memory.

usage: python experiments/inference_peak.py CONFIG STEPS   (CONFIG: a finetune --config file)
"""
import json
import sys

from tqdm import tqdm

from ortzo.config import RunConfig, read_file
from ortzo.model.session import ScoringSession
from ortzo.recipes.measure import peak_rss_mib
from ortzo.recipes.setup import prepare
from ortzo.tasks.objective import evaluate
from ortzo.tasks.task import load_task

config, steps = sys.argv[1], int(sys.argv[2])
cfg = RunConfig.build(read_file(config)).resolved()
setup = prepare(cfg, load_task(cfg.task, cfg.template))
session = ScoringSession(setup.model_dir, setup.load_store(), setup.target)
scores = evaluate(session, setup.encoder, setup.splits.eval, cfg.eval_batch_size, desc="evaluation")
after_eval = peak_rss_mib()
longest = 0
for step in tqdm(range(steps), desc="training batches, forward only"):
    batch = setup.train_batch(step)
    session(batch.feeds)
    longest = max(longest, batch.feeds["input_ids"].shape[1])
after_batches = peak_rss_mib()
evaluate(session, setup.encoder, setup.splits.eval, cfg.eval_batch_size, desc="evaluation again")
print(json.dumps({"config": config, "seed": cfg.seed, "template": cfg.template, "eval_accuracy": scores["accuracy"],
                  "peak_rss_mib_after_eval": round(after_eval, 1), "train_batches": steps,
                  "peak_rss_mib_after_batches": round(after_batches, 1),
                  "longest_train_batch": longest, "peak_rss_mib": round(peak_rss_mib(), 1)}))
