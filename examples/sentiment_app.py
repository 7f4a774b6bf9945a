"""A sentiment app: classify sentences with an ONNX text-classification model through plain
onnxruntime and tokenizers. The lines marked `# + ortzo` add on-device fine-tuning of that same
model with MeZO (two forward passes a step through the inference session: no gradients, no
training framework, no torch) and print the accuracy before and after.

    python examples/sentiment_app.py MODEL.onnx [--data ../shared/data/sst2] [--steps 1000]

MODEL.onnx is, for one, Optimum's text-classification export of all-MiniLM-L6-v2 with its
tokenizer.json beside it (examples/README.md shows the export). The data is SST-2 as JSON Lines
(`{"sentence": ..., "label": 0 or 1}`): train.jsonl and validation.jsonl in --data.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

import ortzo  # + ortzo

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][:limit]


class SentimentApp:
    """Sentences in, labels out (0: negative, 1: positive)."""

    def __init__(self, model_path: Path, max_length: int = 64) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_path.parent / "tokenizer.json"))
        pad = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
        self.tokenizer.enable_truncation(max_length)
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        self.run = lambda feeds: dict(zip(outputs, session.run(None, feeds)))

    def feeds(self, sentences: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer.encode_batch(sentences)
        columns = {"input_ids": [e.ids for e in encoded], "attention_mask": [e.attention_mask for e in encoded],
                   "token_type_ids": [e.type_ids for e in encoded]}
        return {name: np.array(columns[name], np.int64) for name in self.inputs}

    def classify(self, sentences: list[str]) -> np.ndarray:
        return self.run(self.feeds(sentences))["logits"].argmax(axis=1)

    def accuracy(self, rows: list[dict], batch_size: int = 64) -> float:
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        right = sum(int((self.classify([r["sentence"] for r in c]) == [r["label"] for r in c]).sum()) for c in chunks)
        return right / len(rows)


def batches(app: SentimentApp, rows: list[dict], size: int) -> Iterator[dict]:  # + ortzo
    """Endless batches of sentences of similar length (little padding), labels beside the feeds."""
    rows, rng = sorted(rows, key=lambda r: len(r["sentence"])), np.random.default_rng(0)  # + ortzo
    while True:  # + ortzo
        for b in (rows[i:i + size] for i in rng.permutation(range(0, len(rows) - size + 1, size))):  # + ortzo
            yield app.feeds([r["sentence"] for r in b]) | {"labels": np.array([r["label"] for r in b])}  # + ortzo


def cross_entropy(outputs: dict[str, np.ndarray], batch: dict) -> float:  # + ortzo
    z = outputs["logits"].astype(np.float64)  # + ortzo
    return float((np.logaddexp.reduce(z, axis=1) - z[np.arange(len(z)), batch["labels"]]).mean())  # + ortzo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an ONNX text-classification model, tokenizer.json beside it")
    p.add_argument("--data", type=Path, default=DATA, help="folder of train.jsonl and validation.jsonl")
    p.add_argument("--eval-examples", type=int, default=None, help="validation sentences (default: all)")
    p.add_argument("--steps", type=int, default=1000, help="MeZO steps")  # + ortzo
    p.add_argument("--batch-size", type=int, default=64)  # + ortzo
    p.add_argument("--lr", type=float, default=0.2)  # + ortzo
    p.add_argument("--work", type=Path, default=Path("runs/sentiment-app"), help="trainable folder, weights")  # + ortzo
    a = p.parse_args(argv)

    app = SentimentApp(a.model)
    validation = read_jsonl(a.data / "validation.jsonl", a.eval_examples)
    model = ortzo.open(ortzo.prepare(a.model, a.work / "model", force=True))  # + ortzo: same graph and weights
    app.run = model.run  # + ortzo: the app now runs the trainable model (its weights bound in place)
    print(f"accuracy before: {app.accuracy(validation):.4f} on {len(validation)} sentences", flush=True)

    model.train(include=["classifier.*"], lr=a.lr, eps=1e-2)  # + ortzo: the (new, random) head only
    start = time.perf_counter()  # + ortzo
    model.fit(batches(app, read_jsonl(a.data / "train.jsonl"), a.batch_size), cross_entropy, steps=a.steps)  # + ortzo
    seconds, sha256 = time.perf_counter() - start, model.save(a.work / "weights.bin")  # + ortzo
    print(f"{a.steps} steps in {seconds:.0f} s; fine-tuned weights {a.work / 'weights.bin'} ({sha256[:12]})")  # + ortzo
    print(f"accuracy after: {app.accuracy(validation):.4f} on {len(validation)} sentences")


if __name__ == "__main__":
    main()
