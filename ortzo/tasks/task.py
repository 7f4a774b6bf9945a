"""Tasks: how an example becomes a prompt, which label words score its classes, and where
its examples come from.

Built-in tasks use MeZO's prompts for causal LMs. A custom task is a TOML spec; every key:

    name = "reviews"                           # default: the file's stem
    template = "Review: {text}\\nSentiment:"    # required; {field}s come from each example
    label_words = [" negative", " positive"]   # required; label i scores label_words[i]
    label_field = "label"                      # the example's integer label (default "label")
    truncate_field = "text"                    # cut from its left when a prompt is too long
    data = "my-data"                           # folder of <split>.jsonl (relative to the
                                               #   spec), or "hub:NAME[:CONFIG]"
    train_split = "train"                      # a split name (<name>.jsonl) or a .jsonl file
    eval_split = "validation"                  # likewise, e.g. "test"
"""
from __future__ import annotations

import string
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import OrtzoError

HUB = "hub:"  # prefix of a `datasets` hub name where a data folder could stand


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    label_words: tuple[str, ...]
    label_field: str = "label"
    truncate_field: str | None = None
    data: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    hub: str | None = None  # built-ins: the `datasets` name[:config] to fall back on
    template_name: str = "mezo"  # built-ins: which of the task's TEMPLATES (a spec: "spec")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.template) if f)

    def prompt(self, example: dict[str, Any], **override: str) -> str:
        """The template filled with the example's stripped fields (MeZO strips them too)."""
        values = {f: str(example[f]).strip() for f in self.fields}
        return self.template.format(**(values | override))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Task:
        return cls(**(d | {"label_words": tuple(d["label_words"])}))


BUILTIN = {
    t.name: t
    for t in (
        Task("sst2", "{sentence} It was", (" terrible", " great"), hub="glue:sst2"),
        Task("sst5", "{sentence} It was", (" terrible", " bad", " okay", " good", " great"), hub="SetFit/sst5"),
        Task("rte", '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n', ("Yes", "No"),
             truncate_field="premise", hub="glue:rte"),
        Task("boolq", "{passage}\nQuestion: {question}?\nAnswer:", (" No", " Yes"),
             truncate_field="passage", hub="super_glue:boolq"),
    )
}

# Other prompts of the built-in tasks, with their label words ("mezo" is MeZO's own, above).
REVIEW = "Review: {sentence}\nSentiment:"
# two demonstrations in context (LM-BFF, Gao et al., ACL 2021): training sentences, negative first,
# picked by their loss on other training rows (experiments/demo_candidates.py; docs/ablation-sst2.md)
DEMOS = ("Review: distanced us from the characters\nSentiment: negative\n\n"
         "Review: is a movie full of grace\nSentiment: positive\n\n")
TEMPLATES: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "sst2": {"review": (REVIEW, (" negative", " positive")),
             "review-demos": (DEMOS + REVIEW, (" negative", " positive"))},
    "sst5": {"review": ("Review: {sentence}\nRating:", (" terrible", " bad", " okay", " good", " great"))},
    "rte": {"qa": ("{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False"))},
    "boolq": {"passage": ("Passage: {passage}\nQuestion: {question}?\nAnswer (yes or no):", (" no", " yes"))},
}

# The prompt each built-in task uses when none is named: the best measured after fine-tuning
# (docs/ablation-sst2.md; SST-2's demonstrations: 0.860 at 30 minutes against review's 0.821, at
# the same memory as inference on the same batches). BoolQ keeps MeZO's: its other prompt scored
# lower.
DEFAULTS = {"sst2": "review-demos", "sst5": "review", "rte": "qa", "boolq": "mezo"}



class TaskSpec(BaseModel):
    """A custom task's TOML keys (the module docstring lists them): unknown keys, wrong types,
    a template without placeholders and fewer than two label words are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    template: str
    label_words: list[str] = Field(min_length=2)
    label_field: str = "label"
    truncate_field: str | None = None
    data: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"

    @field_validator("template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        try:  # parsing also rejects unbalanced braces
            names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        except ValueError as e:
            raise ValueError(str(e)) from None
        if not names:
            raise ValueError("the template has no {field} placeholder")
        return template

    @model_validator(mode="after")
    def _truncated_field_is_prompted(self) -> TaskSpec:
        if self.truncate_field and f"{{{self.truncate_field}}}" not in self.template:
            raise ValueError(f"truncate_field {self.truncate_field!r} is not in the template")
        return self


def templates(task: str) -> tuple[str, ...]:
    """The named prompts of a built-in task, its default first."""
    names = ("mezo", *TEMPLATES.get(task, {}))
    return tuple(sorted(names, key=lambda n: n != DEFAULTS.get(task)))


def load_task(name_or_spec: str, template: str | None = None) -> Task:
    """A built-in task by name, with one of its named prompts (`template`, default: DEFAULTS),
    or a TOML spec file (checked key by key), which has its own."""
    if name_or_spec in BUILTIN:
        task = BUILTIN[name_or_spec]
        template = template or DEFAULTS[name_or_spec]
        if template == "mezo":
            return task
        if template not in TEMPLATES.get(name_or_spec, {}):
            raise OrtzoError(f"task {name_or_spec} has no template {template!r}; its templates: "
                             f"{', '.join(templates(name_or_spec))}")
        text, words = TEMPLATES[name_or_spec][template]
        return replace(task, template=text, label_words=words, template_name=template)
    if template is not None:
        raise OrtzoError("--template names a built-in task's prompt; a task spec has its own template")
    path = Path(name_or_spec)
    if path.suffix != ".toml":
        raise OrtzoError(f"unknown task {name_or_spec!r}; built in: {', '.join(BUILTIN)}, or a .toml spec file")
    if not path.is_file():
        raise OrtzoError(f"task spec not found: {path}")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OrtzoError(f"bad task spec {path}: {e}") from None
    return _from_spec(d, path)


def _from_spec(d: dict[str, Any], path: Path) -> Task:
    try:
        spec = TaskSpec.model_validate(d)
    except ValidationError as e:
        raise OrtzoError(f"bad task spec {path}: {'; '.join(map(_explain, e.errors()))}") from None
    data = spec.data
    if data and not data.startswith(HUB):
        data = str((path.parent / data).resolve())
    return Task(**spec.model_dump(exclude={"name", "label_words", "data"}), name=spec.name or path.stem,
                label_words=tuple(spec.label_words), data=data, template_name="spec")


def _explain(err: dict[str, Any]) -> str:
    key = ".".join(map(str, err["loc"]))
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r} (valid keys: {', '.join(TaskSpec.model_fields)})"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {err['input']!r})" if key else msg
