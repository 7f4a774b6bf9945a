"""Prompts -> the graph's inputs: left padding, attention mask, position ids, and which
positions and candidate ids the scoring head returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

import numpy as np

from ..errors import OrtzoError
from ..model.tokenizer import Tokenizer
from .task import Task


@dataclass(frozen=True)
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray


class Encoder:
    """Encodes a task's examples for one tokenizer; the answer is scored at the last position."""

    def __init__(self, task: Task, tokenizer: Tokenizer, max_length: int = 256) -> None:
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        ids = [tokenizer.encode_plain(w) for w in task.label_words]
        if any(not i for i in ids):
            raise OrtzoError(f"task {task.name}: a label word encodes to no token")
        self.label_ids = np.array([i[0] for i in ids], np.int64)  # first token, as MeZO scores it
        if len(set(self.label_ids.tolist())) != len(ids):
            raise OrtzoError(f"task {task.name}: label words {task.label_words} share their first token")

    def encode(self, example: dict[str, Any]) -> list[int]:
        """Prompt ids, at most max_length. Too long: cut the truncate field from its left
        (BoolQ keeps its question), else drop the prompt's first text tokens. The start
        token, if the model uses one, always stays first."""
        ids = self.tokenizer.encode(self.task.prompt(example))
        over = len(ids) - self.max_length
        field = self.task.truncate_field
        if over > 0 and field:
            text_ids = self.tokenizer.encode_plain(str(example[field]).strip())
            while over > 0 and text_ids:
                text_ids = text_ids[over + 1:]
                ids = self.tokenizer.encode(self.task.prompt(example, **{field: self.tokenizer.decode(text_ids)}))
                over = len(ids) - self.max_length
        if len(ids) <= self.max_length:
            return ids
        bos = self.tokenizer.bos_id
        head = [bos] if bos is not None and ids[0] == bos else []
        return head + ids[len(ids) - self.max_length + len(head):]

    def batch(self, encoded: Sequence[list[int]], labels: Sequence[int]) -> Batch:
        return Batch(collate(encoded, self.tokenizer.pad_id, self.label_ids), np.asarray(labels, np.int64))


def collate(encoded: Sequence[list[int]], pad_id: int, candidates: np.ndarray) -> dict[str, np.ndarray]:
    """Left-pad to the longest; score every row's last position against `candidates`."""
    b, s = len(encoded), max(len(e) for e in encoded)
    input_ids = np.full((b, s), pad_id, np.int64)
    mask = np.zeros((b, s), np.int64)
    for i, e in enumerate(encoded):
        input_ids[i, s - len(e):] = e
        mask[i, s - len(e):] = 1
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
            "score_index": np.arange(b, dtype=np.int64) * s + s - 1,
            "score_ids": np.tile(candidates, (b, 1))}
