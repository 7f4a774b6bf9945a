"""Candidate SST-2 prompts with two demonstrations in context (LM-BFF, Gao et al., ACL 2021),
drawn from the training split, so that choosing one never looks at validation. Draw k picks one
negative and one positive training row of 4-12 words with random.Random(100 + k) and writes the
review prompt behind them in both orders. Screened zero-shot in docs/ablation-sst2.md:

    python experiments/demo_candidates.py ../shared/data/sst2 experiments/prompts 4
    ortzo eval models/smollm2-135m --task experiments/prompts/demos-0-neg-first.toml \
        --data ../shared/data/sst2 --eval-split train --eval-examples 400 --seed 0
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from ortzo.tasks.task import TEMPLATES

REVIEW, WORDS = TEMPLATES["sst2"]["review"]  # label 0, 1


def draw(rows: list[dict], k: int) -> tuple[dict, dict]:
    """Draw k's negative and positive demonstration."""
    short = [r for r in rows if 4 <= len(r["sentence"].split()) <= 12]
    rng = random.Random(100 + k)
    return (rng.choice([r for r in short if r["label"] == 0]), rng.choice([r for r in short if r["label"] == 1]))


def prompt(demos: list[dict]) -> str:
    shown = "".join(REVIEW.format(sentence=r["sentence"].strip()) + WORDS[r["label"]] + "\n\n" for r in demos)
    return shown + REVIEW


def main(data: str, out: str, draws: int) -> None:
    rows = [json.loads(line) for line in (Path(data) / "train.jsonl").read_text().splitlines()]
    Path(out).mkdir(parents=True, exist_ok=True)
    for k in range(draws):
        neg, pos = draw(rows, k)
        for order, demos in (("neg-first", [neg, pos]), ("pos-first", [pos, neg])):
            path = Path(out) / f"demos-{k}-{order}.toml"
            # a JSON string is a valid TOML basic string
            path.write_text(f"# SST-2 prompt with demonstrations, draw {k} (experiments/demo_candidates.py)\n"
                            f'name = "sst2"\ntemplate = {json.dumps(prompt(demos))}\n'
                            f'label_words = {json.dumps(list(WORDS))}\ntruncate_field = "sentence"\n')
            print(path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
