"""Settings as data: every option of every command, with its type, range, default and help,
defined once here and validated by pydantic.

The CLI's options and `--help` are generated from these models; `ortzo finetune --config FILE`
reads the same fields from TOML or JSON (a run's config.json works: its `recorded` section is
ignored), flags given on the command line override the file, and the run's config.json is
the validated `RunConfig` itself.

Whether a setting may change when a run resumes is a property of the setting (`resumable`).
The step log records what each step used (lr, eps, the clipped projected gradient, weight
decay), so those may change; what decides which examples, directions and weights a step sees
(model, task, data, seed, batch size, ...) is fixed at the run's start, and so is the length
of the lr schedule (`schedule_steps`), so a longer `--steps` on resume never raises the lr.
"""
from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import OrtzoError
from .optim.directions import KINDS
from .tasks.task import HUB

RECORDED = "recorded"  # the section of a run's config.json that is not settings


def setting(default: Any, help: str, *, resumable: bool = False, flags: tuple[str, ...] = (), **limits: Any) -> Any:
    """A field with its help text, whether a resumed run may change it, and extra flag names."""
    return Field(default, description=help, json_schema_extra={"resumable": resumable, "flags": list(flags)}, **limits)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def build(cls, values: dict[str, Any], where: str = "") -> Self:
        """Validated settings, or one line naming every bad value."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise OrtzoError(f"{where}{'; '.join(_explain(cls, err) for err in e.errors())}") from None

    @classmethod
    def resumable(cls, name: str) -> bool:
        return bool((cls.model_fields[name].json_schema_extra or {}).get("resumable"))


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _explain(cls: type[Settings], err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule across settings
        return msg
    name = str(err["loc"][0])
    if err["type"] == "extra_forbidden":
        return f"unknown setting {name!r} (valid: {', '.join(cls.model_fields)})"
    if err["type"] == "missing":
        return f"missing setting {name!r}"
    return f"{flag(name)}: {msg} (got {err['input']!r})"


class RunConfig(Settings):
    """Everything that defines a fine-tuning run."""

    model: str = setting(..., "trainable model folder (from `ortzo export`)")
    task: str = setting(..., "built-in task (sst2, sst5, rte, boolq) or a task .toml spec")
    data: str | None = setting(None, f"folder of <split>.jsonl files, or {HUB}NAME[:CONFIG] for a datasets hub "
                               "name; default: the spec's data, $ORTZO_DATA/<task>, the task's hub dataset")
    train_split: str | None = setting(None, "split to train on: a name (reads <name>.jsonl) or a .jsonl file; "
                                      "default: the task's (train)")
    eval_split: str | None = setting(None, "split to evaluate on, likewise; default: the task's (validation)")
    steps: int = setting(1000, "MeZO steps in all (may grow on resume)", resumable=True, ge=1)
    batch_size: int = setting(16, "training examples per step", ge=1)
    lr: float = setting(1e-5, "learning rate (peak, for the linear schedule)", resumable=True, ge=0)
    eps: float = setting(1e-3, "perturbation scale", resumable=True, gt=0)
    schedule: Literal["constant", "linear"] = setting("constant", "learning-rate schedule; linear decays to 0 "
                                                      "at schedule_steps")
    schedule_steps: int | None = setting(None, "steps the schedule spans; default: --steps at the run's start",
                                         ge=1)
    weight_decay: float = setting(0.0, "weight decay on matrices: w <- (1 - lr wd) w each step", resumable=True,
                                  ge=0)
    directions: Literal[KINDS] = setting("rademacher", "distribution of the random directions z")
    n_directions: int = setting(1, "directions per step (q), their updates averaged", resumable=True, ge=1)
    clip: float | None = setting(None, "clip the projected gradient to [-clip, clip]; none: no clipping",
                                 resumable=True, gt=0)
    include: list[str] = setting(["*"], "glob patterns of the parameter names to train", min_length=1)
    exclude: list[str] = setting([], "glob patterns of parameter names to freeze")
    train_examples: int | None = setting(1000, "training examples sampled from the train split; none: all", ge=1)
    k_shot: int | None = setting(None, "k training examples per class instead of --train-examples", ge=1)
    eval_examples: int | None = setting(None, "evaluate on at most this many examples; default: the whole split",
                                        ge=1)
    dev_examples: int | None = setting(None, "also evaluate on N train-split rows kept out of training", ge=1)
    eval_every: int = setting(100, "evaluate every N steps (and at the last)", resumable=True, ge=1)
    eval_batch_size: int = setting(16, "examples per evaluation batch", resumable=True, ge=1)
    checkpoint_every: int = setting(500, "save the weights every N steps (and at the last)", resumable=True, ge=1)
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep", resumable=True, ge=1)
    max_length: int = setting(256, "prompt tokens at most; longer prompts lose the start of their text", ge=2)
    seed: int = setting(0, "seeds the example sample, batch order and directions", ge=0)
    target: str = setting("cpu", "execution-provider target: a name in targets/ or a .toml file",
                          resumable=True, flags=("--provider",))

    @model_validator(mode="after")
    def _decay_keeps_sign(self) -> Self:
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"lr x weight_decay = {self.lr * self.weight_decay:g} must stay below 1")
        return self

    def resolved(self) -> RunConfig:
        """Paths made absolute (so the run works from any folder) and the schedule's length fixed.
        A split given as a .jsonl file counts as a path when it exists from here; otherwise it
        stays relative to the data folder."""
        def absolute(p: str | None) -> str | None:
            return p if p is None or p.startswith(HUB) else str(Path(p).resolve())

        def file(p: str | None, suffix: str) -> str | None:
            return absolute(p) if p and p.endswith(suffix) and Path(p).exists() else p

        return self.model_copy(update={
            "model": absolute(self.model), "data": absolute(self.data), "task": file(self.task, ".toml"),
            "target": file(self.target, ".toml"), "train_split": file(self.train_split, ".jsonl"),
            "eval_split": file(self.eval_split, ".jsonl"), "schedule_steps": self.schedule_steps or self.steps})


class EvalOptions(Settings):
    """`ortzo eval`: unset options come from the run (for a run folder) or RunConfig's defaults."""

    path: str = setting(..., "trainable model folder, or a finetune run folder")
    task: str | None = setting(None, "task; default: the run's (required for a model folder)")
    data: str | None = setting(None, "as for finetune; default: the run's")
    eval_split: str | None = setting(None, "as for finetune; default: the run's")
    eval_examples: int | None = setting(None, "as for finetune; default: the run's", ge=1)
    max_length: int | None = setting(None, "as for finetune; default: the run's", ge=2)
    seed: int | None = setting(None, "seed of the evaluation sample; default: the run's", ge=0)
    eval_batch_size: int | None = setting(None, "examples per batch; default: the run's", ge=1,
                                          flags=("--batch-size",))
    target: str | None = setting(None, "execution-provider target; default: the run's", flags=("--provider",))
    step: int | None = setting(None, "a run's weights after this many steps; default: all logged steps", ge=0)


class ExportOptions(Settings):
    model: str = setting(..., "alias (see export/), hub id, local Hugging Face folder or .gguf file")
    out: str = setting(..., "the trainable model folder to write")
    opset: int = setting(17, "ONNX opset of the exported graph", ge=14)
    force: bool = setting(False, "replace a non-empty --out")
    dtype: Literal["float32", "float16"] = setting("float32", "stored weights; float16 trains through fp32 masters")
    verbose: bool = setting(False, "show the third-party exporters' own output and warnings")


class BenchOptions(Settings):
    model: str = setting(..., "trainable model folder")
    batch_size: int = setting(8, "batch rows", ge=1)
    seq_len: int = setting(64, "tokens per row", ge=1)
    repeats: int = setting(5, "timed (forward, step) pairs per direction kind", ge=1)
    directions: list[Literal[KINDS]] = setting(list(KINDS), "direction kinds to time", min_length=1)
    target: str = setting("cpu", "execution-provider target", flags=("--provider",))


class BenchExportOptions(Settings):
    work: str = setting(..., "folder for the random model and its exports (~7 GB)")
    layers: int = setting(19, "decoder layers (19 x hidden 1536: 2.2 GB of fp32, past protobuf's 2 GB)", ge=1)
    hidden: int = setting(1536, "hidden size (a multiple of 256)", ge=256, multiple_of=256)
    intermediate: int = setting(4096, "MLP size", ge=1)
    vocab: int = setting(32000, "vocabulary size", ge=16)


def add_options(parser: argparse.ArgumentParser, cls: type[Settings], positional: tuple[str, ...] = (),
                optional_positional: bool = False) -> None:
    """One argparse option per field, with its help and default. Options left out of the
    command line are absent from the parsed namespace, so they never override a file."""
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra or {}
        kind, optional = _unwrap(field.annotation)
        help = field.description or ""
        if field.is_required():
            help += " (required)"
        elif "default:" not in help:
            help += f" (default: {_show(field.default)})"
        if extra.get("resumable") and cls is RunConfig:
            help += " [may change on --resume]"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            if get_origin(kind) is list:
                kwargs["nargs"] = "+"
                kind, _ = _unwrap(get_args(kind)[0])
            if get_origin(kind) is Literal:
                kwargs["choices"] = get_args(kind)
            elif optional:
                kwargs["type"] = _none_or_str
        if name in positional:
            parser.add_argument(name, nargs="?" if optional_positional else None, **kwargs)
        else:
            parser.add_argument(flag(name), *extra.get("flags", ()), dest=name, **kwargs)


def given(args: argparse.Namespace, cls: type[Settings]) -> dict[str, Any]:
    """The fields of `cls` that the command line set."""
    return {k: v for k, v in vars(args).items() if k in cls.model_fields}


def read_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .toml or .json file (a run's config.json: its settings only)."""
    path = Path(path)
    if not path.is_file():
        raise OrtzoError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        d = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text) if path.suffix == ".json" else None
    except (ValueError, UnicodeDecodeError) as e:
        raise OrtzoError(f"bad config file {path}: {e}") from None
    if d is None:
        raise OrtzoError(f"config file {path}: expected .toml or .json")
    if not isinstance(d, dict):
        raise OrtzoError(f"bad config file {path}: expected a table of settings")
    d.pop(RECORDED, None)
    return d


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    if get_origin(annotation) in (Union, type(int | None)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def _none_or_str(value: str) -> str | None:
    return None if value.lower() in ("none", "null") else value


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)
