"""Prompts -> the graph's inputs: padding (left, or right where the model asks), attention
mask, position ids, and which positions and candidate ids the scoring head returns.

A label word is scored by the log-likelihood of all its tokens, as MeZO scores an option.
When every word is one token, one sequence per example suffices: its last position scores
all words at once. Otherwise each example becomes one sequence per word (prompt + the word's
tokens but its last), the head returns each word token's log-prob at the position before it,
and `Batch.candidate_scores` sums them per word."""
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
    # multi-token words: [examples * words, scored rows], 1 where a row's log-prob belongs to
    # (example, word); None when the head's rows already are the [examples, words] scores
    combine: np.ndarray | None = None

    def candidate_scores(self, head: np.ndarray) -> np.ndarray:
        """[examples, words] label-word log-likelihoods from the scoring head's output."""
        if self.combine is None:
            return head
        return (self.combine @ head[:, 0].astype(np.float64)).reshape(len(self.labels), -1)


class Encoder:
    """Encodes a task's examples for one tokenizer; the answer is scored at the last position."""

    def __init__(self, task: Task, tokenizer: Tokenizer, max_length: int = 256) -> None:
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        self.label_tokens = [tokenizer.encode_plain(w) for w in task.label_words]
        if any(not t for t in self.label_tokens):
            raise OrtzoError(f"task {task.name}: a label word encodes to no token")
        if len(set(map(tuple, self.label_tokens))) != len(self.label_tokens):
            raise OrtzoError(f"task {task.name}: label words {task.label_words} encode to the same tokens")
        self.single_token = all(len(t) == 1 for t in self.label_tokens)
        self.label_ids = np.array([t[0] for t in self.label_tokens], np.int64)  # their first tokens

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
        labels = np.asarray(labels, np.int64)
        if self.single_token:
            return Batch(collate(encoded, self.tokenizer.pad_id, self.label_ids, self.tokenizer.pad_right), labels)
        feeds, combine = collate_words(encoded, self.tokenizer.pad_id, self.label_tokens, self.tokenizer.pad_right)
        return Batch(feeds, labels, combine)


def collate(encoded: Sequence[list[int]], pad_id: int, candidates: np.ndarray,
            right: bool = False) -> dict[str, np.ndarray]:
    """Pad to the longest, on the left (or `right`: GroupQueryAttention's prompts, which
    read each row's length from the mask); score every row's last token against `candidates`."""
    b, s = len(encoded), max(len(e) for e in encoded)
    input_ids = np.full((b, s), pad_id, np.int64)
    mask = np.zeros((b, s), np.int64)
    for i, e in enumerate(encoded):
        at = slice(0, len(e)) if right else slice(s - len(e), s)
        input_ids[i, at] = e
        mask[i, at] = 1
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    last = np.array([len(e) - 1 if right else s - 1 for e in encoded], np.int64)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
            "score_index": np.arange(b, dtype=np.int64) * s + last,
            "score_ids": np.tile(candidates, (b, 1))}


def collate_words(encoded: Sequence[list[int]], pad_id: int, words: Sequence[list[int]],
                  right: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One padded sequence per (example, word): the prompt, then the word's tokens but its
    last. Each word token is scored at the position before it; returns the feeds and the
    [examples * words, scored rows] matrix that sums a word's rows."""
    seqs = [e + w[:-1] for e in encoded for w in words]
    feeds = collate(seqs, pad_id, np.zeros(1, np.int64), right)
    s = feeds["input_ids"].shape[1]
    index, ids, owner = [], [], []
    for r, (seq, w) in enumerate(zip(seqs, (w for _ in encoded for w in words))):
        end = len(seq) if right else s  # one past the row's last token
        first = r * s + end - len(w)  # the prompt's last position predicts the word's first token
        index += range(first, first + len(w))
        ids += w
        owner += [r] * len(w)
    combine = np.zeros((len(seqs), len(ids)))
    combine[owner, np.arange(len(ids))] = 1.0
    return feeds | {"score_index": np.array(index, np.int64),
                    "score_ids": np.array(ids, np.int64)[:, None]}, combine
