"""Would averaging the iterates help? For a finished run: replay its step log, average the trained
buffers over the steps [from, end), and score the average on the whole evaluation split."""
import json
import sys
from pathlib import Path

import numpy as np

from ortzo.config import RECORDED, RunConfig
from ortzo.engines.base import record_type
from ortzo.optim import steplog
from ortzo.run import checkpoint
from ortzo.run.folder import RunFolder
from ortzo.recipes.setup import prepare
from ortzo.tasks.objective import evaluate
from ortzo.tasks.task import Task

run_dir, fractions = Path(sys.argv[1]), [float(f) for f in sys.argv[2:]]
run = RunFolder(run_dir)
saved = run.read_config()
recorded = saved.pop(RECORDED)
cfg = RunConfig.from_saved(saved)
setup = prepare(cfg, Task.from_json(recorded["task"]), recorded=recorded)
log = steplog.read(run.steps, record_type(cfg.engine))
n = len(log.records)
for frac in fractions:
    start = int(n * frac)
    engine = checkpoint.restore(run.path, log.records, start, setup.load_store, setup.engine)
    total = [b.astype(np.float64) for b in engine.buffers]
    for r in log.records[start:]:
        engine.replay([r])
        for t, b in zip(total, engine.buffers):
            t += b
    for t, b in zip(total, engine.buffers):
        b[...] = (t / (n - start + 1)).astype(b.dtype)
    res = evaluate(engine.score, setup.encoder, setup.splits.eval, cfg.eval_batch_size, desc="eval")
    print(json.dumps({"run": str(run_dir), "steps": n, "average_from": start, **res}), flush=True)
