"""`ortzo memory --validate FOLDER...`: the memory model against measured peak RSS.

For each trainable folder, batch shape and method, one child process opens the engine over
the folder and runs a warm-up step and one more on a batch of full random rows (the worst
case of a shape: no padding), and reports its peak RSS (VmHWM); the memory model predicts the
same step (`padded=False`). A row is within target if |predicted - measured| <= 10 % of the
measured. Children run one at a time, so their peaks are their own. A folder with a frozen
int4/int8 base is measured for ort-mezo only (the PyTorch engines need a plain folder) and
predicted with its own quantization settings.

The model predicts the bytes in use at the step's peak. glibc's malloc, by default, raises its
mmap threshold as large blocks are freed and then serves activations from the heap, where
freed ones stay resident: backprop's peak RSS then exceeds the bytes in use by 15-25 %
(SmolLM2, Gemma 3). The children therefore run with a fixed threshold
(MALLOC_MMAP_THRESHOLD_=65536), which returns freed activations to the system, so RSS
measures the bytes in use; `--default-malloc` measures as a user's run would, slack included."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from ..errors import OrtzoError
from ..files import atomic_open
from ..memory import estimate
from ..model.manifest import Manifest, hf_config
from ..output import progress
from .measure import in_child

# (name, engine, settings): the methods of the table
METHODS = (("ort-mezo", "ort", {}), ("torch-mezo", "torch-mezo", {}),
           ("bp adamw", "torch-bp", {"optimizer": "adamw"}), ("bp sgd", "torch-bp", {"optimizer": "sgd"}),
           ("bp adamw ckpt 0.5", "torch-bp", {"optimizer": "adamw", "checkpoint_fraction": 0.5}))
SHAPES = ((8, 64), (16, 128))
TARGET = 0.10


EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def validate(models: list[Path], out: Path | None = None, default_malloc: bool = False) -> list[dict]:
    runs = [(m, shape, method) for m in models for shape in SHAPES for method in METHODS
            if not Manifest.load(m).base or method[1] == "ort"]
    env = None if default_malloc else EXACT_MALLOC
    rows = []
    for model, (b, s), (name, engine, settings) in progress(runs, desc="memory", unit="run", dynamic_ncols=True):
        measured = in_child("steps", model, engine, b, s, 1, json.dumps(settings), env=env)["peak_rss_mib"]
        method = "bp" if engine == "torch-bp" else name
        predicted = estimate(hf_config(model), b, s, method=method, optimizer=settings.get("optimizer", "adamw"),
                             checkpoint_fraction=settings.get("checkpoint_fraction", 0.0), padded=False,
                             **frozen_base(Manifest.load(model))).total / 2**20
        rows.append({"model": model.name, "batch": b, "seq": s, "method": name, "predicted_mib": round(predicted),
                     "measured_mib": round(measured), "error": round((predicted - measured) / measured, 4)})
    print("malloc: " + ("glibc's defaults" if default_malloc else "MALLOC_MMAP_THRESHOLD_=65536 (RSS = bytes in use)"))
    print(f"{'model':<16} {'batch x seq':>11} {'method':<18} {'predicted MiB':>13} {'measured MiB':>12} {'error':>7}")
    for r in rows:
        flag = "" if abs(r["error"]) <= TARGET else "  (outside 10 %)"
        print(f"{r['model']:<16} {r['batch']:>5} x {r['seq']:<5} {r['method']:<18} {r['predicted_mib']:>13} "
              f"{r['measured_mib']:>12} {r['error']:>+7.1%}{flag}")
    inside = sum(abs(r["error"]) <= TARGET for r in rows)
    print(f"{inside} of {len(rows)} rows within 10 %; largest error {max(abs(r['error']) for r in rows):.1%}")
    if out is not None:
        with atomic_open(out, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def frozen_base(m: Manifest) -> dict[str, Any]:
    """The memory model's settings for a folder's frozen base (none: a plain folder)."""
    b = m.base
    if not b:
        return {}
    if b["quantize"] == "none":
        raise OrtzoError("the memory model covers int4 and int8 frozen bases, not a LoRA-only one")
    embedding = b.get("embedding", "int8")
    # --widths source keeps a GGUF's wider matrices at int8: priced as int8 throughout, an upper
    # bound (Gemma 3 270M's such base: 443 MiB written, 454 priced as stored)
    return {"base": "int8" if b.get("widths") == "source" else b["quantize"], "block_size": b["block_size"], "symmetric": b["symmetric"],
            "embedding": 0 if embedding == "stored" else int(embedding.removeprefix("int")),
            "lora_rank": (b.get("lora") or {}).get("r", 0), "accuracy_level": b.get("accuracy_level", 4)}
