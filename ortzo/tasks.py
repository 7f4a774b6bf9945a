"""Tasks: how an example becomes a prompt and which label words score its classes.

Built-in tasks use MeZO's prompts for causal LMs. A custom task is a TOML spec:

    name = "my-task"
    template = "Review: {text}\\nSentiment:"
    label_words = [" negative", " positive"]   # label i -> label_words[i]
    label_field = "label"                      # optional
    truncate_field = "text"                    # optional: cut from its left when too long
    data = "path/to/folder"                    # optional: folder of train.jsonl, validation.jsonl
"""
from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OrtzoError


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    label_words: tuple[str, ...]
    label_field: str = "label"
    truncate_field: str | None = None
    hub: tuple[str, ...] = ()  # `datasets` name (and config) to fall back on
    data: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.template) if f)

    def prompt(self, example: dict[str, Any], **override: str) -> str:
        """The template filled with the example's stripped fields (MeZO strips them too)."""
        values = {f: str(example[f]).strip() for f in self.fields}
        return self.template.format(**(values | override))


BUILTIN = {
    t.name: t
    for t in (
        Task("sst2", "{sentence} It was", (" terrible", " great"), hub=("glue", "sst2")),
        Task("sst5", "{sentence} It was", (" terrible", " bad", " okay", " good", " great"), hub=("SetFit/sst5",)),
        Task("rte", '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n', ("Yes", "No"),
             truncate_field="premise", hub=("glue", "rte")),
        Task("boolq", "{passage}\nQuestion: {question}?\nAnswer:", (" No", " Yes"),
             truncate_field="passage", hub=("super_glue", "boolq")),
    )
}


def load_task(name_or_spec: str) -> Task:
    if name_or_spec in BUILTIN:
        return BUILTIN[name_or_spec]
    path = Path(name_or_spec)
    if path.suffix != ".toml":
        raise OrtzoError(f"unknown task {name_or_spec!r}; built in: {', '.join(BUILTIN)}, or a .toml spec file")
    if not path.is_file():
        raise OrtzoError(f"task spec not found: {path}")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
        data = d.get("data")
        task = Task(name=str(d.get("name", path.stem)), template=str(d["template"]),
                    label_words=tuple(str(w) for w in d["label_words"]),
                    label_field=str(d.get("label_field", "label")), truncate_field=d.get("truncate_field"),
                    data=str((path.parent / data).resolve()) if data else None)
        if not task.fields:  # parsing the template also rejects unbalanced braces
            raise OrtzoError(f"bad task spec {path}: the template has no {{field}} placeholder")
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise OrtzoError(f"bad task spec {path}: {type(e).__name__}: {e}") from None
    if len(task.label_words) < 2:
        raise OrtzoError(f"bad task spec {path}: needs at least two label_words")
    if task.truncate_field and task.truncate_field not in task.fields:
        raise OrtzoError(f"bad task spec {path}: truncate_field {task.truncate_field!r} is not in the template")
    return task
