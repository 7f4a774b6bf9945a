"""`ortzo bench`: is a MeZO step close to the two forwards it cannot avoid, and does it fit
in inference memory?

Each direction kind runs in a fresh process, so its peak RSS is its own; inside it, forwards
and steps are timed in turn (forward, step, forward, step, ...), so the step/forward ratio
compares the two under the same conditions."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..model.manifest import Manifest
from ..model.session import ScoringSession
from ..model.targets import load_target
from ..model.weights import WeightStore
from ..optim.directions import Directions
from ..optim.mezo import mezo_step
from ..tasks.objective import loss
from .measure import in_child, peak_rss_mib, random_batch


def bench_step(model: Path, batch_size: int, seq_len: int, repeats: int, target: str, kinds: list[str]) -> None:
    args = ["step", str(model), str(batch_size), str(seq_len), str(repeats), target]
    infer = _child(args + ["inference"])
    print(f"{model.name}: batch {batch_size} x seq {seq_len}, {repeats} repeats, median times")
    print(f"inference: forward {infer['forward_s']:.3f} s, peak RSS {infer['peak_rss_mib']:.0f} MiB")
    print(f"{'directions':<15} {'forward s':>9} {'step s':>7} {'step/(2 fwd)':>12} {'perturb share':>13} "
          f"{'peak RSS MiB':>12} {'RSS vs infer':>12}")
    for kind in kinds:
        r = _child(args + [kind])
        print(f"{kind:<15} {r['forward_s']:>9.3f} {r['step_s']:>7.3f} {r['step_s'] / (2 * r['forward_s']):>12.2f} "
              f"{r['perturb_s'] / r['step_s']:>13.1%} {r['peak_rss_mib']:>12.0f} "
              f"{r['peak_rss_mib'] / infer['peak_rss_mib']:>12.2f}")


def bench_engines(model: Path, batch_size: int, seq_len: int, repeats: int, engines: list[str]) -> None:
    """Step time of each engine, timed interleaved in one process, and the peak RSS of each
    alone in its own; checked against the targets ortzo exists for (issue 6): an ORT MeZO
    step at most 0.35 x a PyTorch MeZO step, in at most 0.30 x the memory of backprop with AdamW."""
    times = in_child("interleaved", model, batch_size, seq_len, repeats, *engines)
    rss = {e: in_child("steps", model, e, batch_size, seq_len, 2, "{}")["peak_rss_mib"] for e in engines}
    print(f"{model.name}: batch {batch_size} x seq {seq_len}, engines interleaved, median of {repeats} steps")
    print(f"{'engine':<12} {'step s':>7} {'peak RSS MiB':>12}")
    for e in engines:
        print(f"{e:<12} {times[e]:>7.3f} {rss[e]:>12.0f}")
    for ours, theirs, what, target in (("step", "torch-mezo", "step time", 0.35), ("rss", "torch-bp", "peak RSS", 0.30)):
        if "ort" in engines and theirs in engines:
            a, b = (times["ort"], times[theirs]) if ours == "step" else (rss["ort"], rss[theirs])
            print(f"ort / {theirs} {what}: {a / b:.2f} (target <= {target}: {'met' if a / b <= target else 'MISSED'})")


def bench_export(work: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> None:
    """Peak RSS of the conversion pass on a random Llama of several GB (untied, fp32).

    The model is built and exported by Optimum in their own processes; the pass that turns the
    export into a trainable folder runs alone in a third, so its peak RSS is its own."""
    hf, onnx_dir, out = work / "hf", work / "onnx", work / "trainable"
    if not (hf / "config.json").is_file():
        _child(["random-llama", str(hf), str(layers), str(hidden), str(intermediate), str(vocab)])
    if not (onnx_dir / "model.onnx").is_file():
        from optimum.exporters.onnx import main_export  # noqa: F401  (fail early without the extra)

        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from ortzo.model.export.trace import optimum_export; "
                        "optimum_export(Path(sys.argv[1]), Path(sys.argv[2]), 17)", str(hf), str(onnx_dir)],
                       check=True)
    r = _child(["convert", str(onnx_dir / "model.onnx"), str(hf), str(out)])
    graph_mib = (out / "model.onnx").stat().st_size / 2**20
    print(f"random Llama: {r['weights_bytes'] / 2**30:.2f} GiB of fp32 weights, weight-free graph {graph_mib:.1f} MiB")
    print(f"conversion pass: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB = "
          f"{r['peak_rss_mib'] * 2**20 / r['weights_bytes']:.2f} x the weight bytes")
    c = _child(["check", str(out), str(hf)])
    print(f"the folder loads in ORT: max |ORT - PyTorch| over scored log-probs = {c['max_abs_diff']:.2e}")


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "ortzo.recipes.bench", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _random_llama(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # equal initializers would be merged by the exporter
                p.normal_(1.0, 0.1)
    model.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def _check(folder: Path, hf: Path) -> dict:
    """Scores of the trainable folder against the PyTorch model it came from."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..tasks.batches import collate

    store = WeightStore.load(folder, Manifest.load(folder))
    session = ScoringSession(folder, store, load_target("cpu"))
    feeds = collate([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0, np.array([1, 2, 3]))
    got = session(feeds)
    del session, store
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**{k: torch.tensor(feeds[k]) for k in ("input_ids", "attention_mask", "position_ids")}).logits
    want = torch.log_softmax(logits[:, -1], -1)[:, [1, 2, 3]].numpy()
    return {"max_abs_diff": float(np.abs(got - want).max())}


def _convert(onnx_path: Path, hf: Path, out: Path) -> dict:
    import shutil

    from ..model.export.convert import convert

    from tokenizers import Tokenizer, models

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(out / "tokenizer.json"))  # no text here
    t = time.perf_counter()
    m = convert(onnx_path, hf, out, {"file": "tokenizer.json", "add_bos": False, "bos_id": None, "pad_id": 0},
                source={"model": str(hf)})
    return {"seconds": time.perf_counter() - t, "weights_bytes": m.weights_bytes}


def _measure(model: Path, batch_size: int, seq_len: int, repeats: int, target_name: str, mode: str) -> dict:
    manifest = Manifest.load(model)
    store = WeightStore.load(model, manifest)
    target = load_target(target_name)
    session = ScoringSession(model, store, target)
    batch = random_batch(batch_size, seq_len, 1000)
    feeds, labels = batch.feeds, batch.labels
    session(feeds)  # warm-up: ORT allocates its arenas on the first run
    directions = _TimedDirections(mode, target.direction_threads or None) if mode != "inference" else None
    buffers = store.trainable(list(store.arrays)) if directions else []  # fp32 masters for fp16 weights

    def step(k: int) -> float:
        directions.seconds = 0.0
        t = time.perf_counter()
        mezo_step(buffers, lambda: loss(session(feeds), labels), step=k, seed=k, eps=1e-3, lr=1e-6,
                  directions=directions)
        return time.perf_counter() - t

    if directions:
        step(0)  # warm-up: builds the noise table, if any
    fwd, steps = [], []
    for k in range(1, repeats + 1):  # interleaved: forward, step, forward, step, ...
        t = time.perf_counter()
        session(feeds)
        fwd.append(time.perf_counter() - t)
        if directions:
            steps.append((step(k), directions.seconds))
    result = {"forward_s": statistics.median(fwd)}
    if steps:
        result |= {"step_s": statistics.median(s for s, _ in steps), "perturb_s": statistics.median(p for _, p in steps)}
    return result


class _TimedDirections(Directions):
    seconds = 0.0

    def add(self, buffers, seed, scale):
        t = time.perf_counter()
        super().add(buffers, seed, scale)
        self.seconds += time.perf_counter() - t


if __name__ == "__main__":
    what, *a = sys.argv[1:]
    if what == "step":
        result = _measure(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4], a[5])
    elif what == "check":
        result = _check(Path(a[0]), Path(a[1]))
    elif what == "random-llama":
        result = _random_llama(Path(a[0]), *map(int, a[1:]))
    else:
        result = _convert(Path(a[0]), Path(a[1]), Path(a[2]))
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))
