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
of the lr schedule (`schedule_steps`, `schedule_seconds`), so a longer `--steps` or
`--time-budget` on resume never raises the lr.
"""
from __future__ import annotations

import argparse
import json
import logging
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .engines.base import ENGINES
from .errors import OrtzoError
from .optim.directions import DEFAULT_KIND, KINDS

if TYPE_CHECKING:
    from .model.lora import LoraSpec
    from .model.quantize import QuantSpec
from .optim.estimators import ESTIMATORS
from .optim.mezo import EPS_MAX, LR_MAX, SCHEDULES
from .optim.precondition import SCALES
from .model.placement import PROVIDERS
from .model.weights import PARAMS
from .tasks.task import HUB

RECORDED = "recorded"  # the section of a run's config.json that is not settings
logger = logging.getLogger(__name__)


def setting(default: Any, help: str, *, resumable: bool = False, flags: tuple[str, ...] = (),
            deprecated_flags: tuple[str, ...] = (), renamed: dict[str, str] | None = None, **limits: Any) -> Any:
    """A field with its help text, whether a resumed run may change it, and extra flag names;
    `deprecated_flags` and `renamed` (old value -> new) still work for one release, with a warning."""
    return Field(default, description=help, json_schema_extra={
        "resumable": resumable, "flags": list(flags), "deprecated_flags": list(deprecated_flags),
        "renamed": renamed or {}}, **limits)


def _extra(field: Any) -> dict[str, Any]:
    return field.json_schema_extra or {}


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # --help's sections: title -> the fields under it (the others: "options")
    groups: ClassVar[dict[str, tuple[str, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_values(cls, values: Any) -> Any:
        """An old name of a value still works for one release, with a warning."""
        if not isinstance(values, dict):
            return values
        out = dict(values)
        for k, v in values.items():
            renamed = _extra(cls.model_fields[k]).get("renamed") if k in cls.model_fields else None
            for old in [x for x in (v if isinstance(v, list) else [v]) if renamed and x in renamed]:
                logger.warning(f"{flag(k)} {old} is deprecated and goes in the next release: "
                               f"use {flag(k)} {renamed[old]}")
            if renamed:
                out[k] = [renamed.get(x, x) for x in v] if isinstance(v, list) else renamed.get(v, v)
        return out

    @model_validator(mode="before")
    @classmethod
    def _none_words(cls, values: Any) -> Any:
        """TOML has no null: in a config file "none" stands for it, as on the command line."""
        if not isinstance(values, dict):
            return values
        return {k: None if isinstance(v, str) and v.lower() in ("none", "null") and k in cls.model_fields
                and _unwrap(cls.model_fields[k].annotation)[1] else v for k, v in values.items()}

    @classmethod
    def build(cls, values: dict[str, Any], where: str = "") -> Self:
        """Validated settings, or one line naming every bad value."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise OrtzoError(f"{where}{'; '.join(_explain(cls, err) for err in e.errors())}") from None

    @classmethod
    def resumable(cls, name: str) -> bool:
        return bool(_extra(cls.model_fields[name]).get("resumable"))


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


# What a MeZO run through ONNX Runtime gets unless told otherwise, per estimator and the parameters
# it perturbs: the recipe measured best (docs/ablation-sst2.md). MeZO perturbs the vectors (norm
# scales, biases) unless include/exclude patterns say what trains; every parameter takes a 4x smaller
# lr. FZOO's update is normalized, hence its far smaller lr; it was measured on every parameter, and
# an estimator without a recipe for the vectors gets its every-parameter one.
RECIPE = {("mezo", "vectors"): {"lr": 2e-4, "clip": 30.0, "schedule": "linear"},
          ("mezo", "all"): {"lr": 5e-5, "clip": 30.0},
          ("fzoo", "all"): {"lr": 1e-6, "clip": None}}
# With MEAZO's adaptive step --lr is a step length: 1e-3 on the vectors applied ~1.6e-4 at the start, about
# MeZO's 2e-4 (the rms of the projected gradient there is ~6-7); on every parameter it is unmeasured.
MEAZO_LR = 1e-3


# Settings added after runs were written, with what those runs did (today's defaults differ, and a
# resumed or replayed run must do what it did): random batches. (Every parameter trained: a saved
# config always names its include patterns, and patterns choose among all parameters.)
BEFORE_THEIR_TIME = {"group_by_length": 1}


class RunConfig(Settings):
    """Everything that defines a fine-tuning run."""

    groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "task and data": ("task", "template", "data", "train_split", "eval_split", "train_examples", "k_shot",
                          "max_length"),
        "training": ("steps", "time_budget", "batch_size", "lr", "eps", "schedule", "schedule_steps",
                     "schedule_seconds", "weight_decay", "directions", "estimator", "adaptive", "direction_scale",
                     "n_directions", "clip", "params", "include", "exclude", "group_by_length", "seed"),
        "evaluation": ("eval_examples", "dev_examples", "eval_every", "eval_subset", "eval_batch_size"),
        "checkpoints": ("checkpoint_every", "keep_checkpoints"),
        "engine and target": ("target", "engine", "optimizer", "momentum", "checkpoint_fraction")}

    @classmethod
    def from_saved(cls, saved: dict[str, Any], where: str = "") -> Self:
        """The config of a run's config.json (its settings, `recorded` removed), as the run had it."""
        return cls.build(BEFORE_THEIR_TIME | saved, where)

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, values: Any) -> Any:
        """The ort engine's estimator picks the defaults of the settings it was measured with."""
        if isinstance(values, dict) and values.get("engine", "ort") == "ort":
            estimator = values.get("estimator", "mezo")
            every = "include" in values or "exclude" in values or estimator != "mezo"
            params = values.get("params", "all" if every else "vectors")
            recipe = RECIPE.get((estimator, params), RECIPE.get((estimator, "all"), {}))
            if values.get("adaptive") == "meazo":
                recipe = recipe | {"lr": MEAZO_LR}
            return {"params": params} | recipe | values
        return values

    model: str = setting(..., "trainable model folder (from `ortzo export`)")
    task: str = setting(..., "built-in task (sst2, sst5, rte, boolq) or a task .toml spec")
    template: str | None = setting(None, "a built-in task's named prompt: mezo (MeZO's own) or sst2 and sst5: "
                                   "review; sst2: review-demos; rte: qa; boolq: passage; default: the best measured "
                                   "(sst2: review-demos; sst5: review; rte: qa; boolq: mezo)")
    data: str | None = setting(None, f"folder of <split>.jsonl files, or {HUB}NAME[:CONFIG] for a datasets hub "
                               "name; default: the spec's data, $ORTZO_DATA/<task>, the task's hub dataset")
    train_split: str | None = setting(None, "split to train on: a name (reads <name>.jsonl) or a .jsonl file; "
                                      "default: the task's (train)")
    eval_split: str | None = setting(None, "split to evaluate on, likewise; default: the task's (validation)")
    steps: int = setting(1000, "steps in all (may grow on resume)", resumable=True, ge=1)
    time_budget: float | None = setting(None, "end the run after the step at which its steps' seconds "
                                        "(train_seconds) reach this; evaluated and saved there", resumable=True, gt=0)
    batch_size: int = setting(16, "training examples per step", ge=1)
    lr: float = setting(1e-5, "learning rate (peak, for the linear schedule); default: 2e-4 (mezo on the vectors), "
                              "5e-5 (mezo on all), 1e-3 (with --adaptive meazo), 1e-6 (fzoo), 1e-5 (the torch "
                              "engines)", resumable=True, ge=0, le=LR_MAX)
    eps: float = setting(1e-3, "perturbation scale", resumable=True, gt=0, le=EPS_MAX)
    schedule: Literal[SCHEDULES] = setting("constant", "learning-rate schedule; linear decays "
                                                             "to 0 at schedule_steps; wsd: constant, then linear "
                                                             "to 0 over the last third of schedule_steps; default: "
                                                             "linear (mezo on the vectors), constant")
    schedule_steps: int | None = setting(None, "steps the schedule spans; default: --steps at the run's start "
                                         "(a resume that raises --steps raises this too, or the extra steps "
                                         "run at lr 0)", resumable=True, ge=1)
    schedule_seconds: float | None = setting(None, "seconds of steps (train_seconds) the schedule spans as well: "
                                             "each step takes the lower lr of the two spans, so the lr reaches "
                                             "0 when the run ends, by steps or by time; default: --time-budget, "
                                             "unless --schedule-steps is given", resumable=True, gt=0)
    weight_decay: float = setting(0.0, "weight decay on matrices: w <- (1 - lr wd) w each step", resumable=True,
                                  ge=0, allow_inf_nan=False)
    directions: Literal[KINDS] = setting(DEFAULT_KIND, "distribution of the random directions z (rademacher-counter: "
                                         "+-1 signs computed identically on CPU and GPU)")
    estimator: Literal[ESTIMATORS] = setting("mezo", "mezo: two-sided SPSA, 2 forwards per direction; fzoo: "
                                                 "one-sided directions sharing one base loss (N + 1 forwards), the "
                                                 "update divided by the losses' spread (needs --n-directions >= 2, "
                                                 "no --clip; its lr is far smaller)")
    adaptive: Literal["none", "meazo"] = setting("none", "meazo: MEAZO's adaptive step (arXiv 2605.03869), each "
                                                "step's lr divided by the root of a moving average of the squared "
                                                "projected gradient, so --lr is a step length: ~ MeZO's lr x |g| "
                                                "(default 1e-3; mezo only)")
    direction_scale: Literal[SCALES] = setting("none", "scale each tensor's directions by a fixed factor "
                                              "(a diagonal preconditioner, recorded at the run's start): "
                                              "weight-rms: the root of the tensor's weight rms over their "
                                              "mean, so small-weight tensors take smaller steps")
    n_directions: int = setting(1, "directions per step (q), their updates averaged", resumable=True, ge=1)
    clip: float | None = setting(None, "clip the projected gradient to [-clip, clip]; none: no clipping; "
                                 "default: 30 (mezo), none (fzoo, the torch engines)", resumable=True, gt=0)
    params: Literal[PARAMS] = setting("all", "the parameters include/exclude choose from: all, or "
                                                "vectors (the one-dimensional ones: norm scales and biases, 35k of "
                                                "SmolLM2's 135M); default: vectors (mezo without --include or "
                                                "--exclude), all (fzoo, the torch engines)")
    include: list[str] = setting(["*"], "glob patterns of the parameter names to train", min_length=1)
    exclude: list[str] = setting([], "glob patterns of parameter names to freeze")
    group_by_length: int = setting(1, "cut the training batches from runs of N random batches sorted by prompt "
                                   "length: less padding, faster steps, but each step learns less (measured on "
                                   "SST-2: docs/ablation-sst2.md); 1: random batches", ge=1)
    train_examples: int | None = setting(1000, "training examples sampled from the train split; none: all", ge=1)
    k_shot: int | None = setting(None, "k training examples per class instead of --train-examples", ge=1)
    eval_examples: int | None = setting(None, "evaluate on at most this many examples; default: the whole split",
                                        ge=1)
    dev_examples: int | None = setting(None, "also evaluate on N train-split rows kept out of training", ge=1)
    eval_every: int = setting(100, "evaluate every N steps (and at the last)", resumable=True, ge=1)
    eval_subset: int | None = setting(None, "evaluate on a fixed sample of N evaluation rows on the schedule, "
                                      "the whole evaluation set at step 0 and at the end; none: always the whole",
                                      resumable=True, ge=1)
    eval_batch_size: int = setting(16, "examples per evaluation batch", resumable=True, ge=1)
    checkpoint_every: int = setting(500, "save the weights every N steps (and at the last)", resumable=True, ge=1)
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep", resumable=True, ge=1)
    max_length: int = setting(256, "prompt tokens at most; longer prompts lose the start of their text", ge=2)
    seed: int = setting(0, "seeds the example sample, batch order and directions", ge=0)
    target: str = setting("cpu", "execution-provider target: a name in targets/ or a .toml file",
                          resumable=True, flags=("--provider",))
    engine: Literal[ENGINES] = setting("ort", "ort: MeZO through ONNX Runtime; the PyTorch baselines (the export "
                                       "extra): torch-bp, backprop, and torch-mezo, MeZO as its reference code")
    optimizer: Literal["adamw", "sgd", "momentum"] = setting("adamw", "torch-bp: AdamW, SGD, or SGD with momentum")
    momentum: float = setting(0.9, "torch-bp with --optimizer momentum: the momentum", ge=0, lt=1)
    checkpoint_fraction: float = setting(0.0, "torch-bp: fraction of the layers whose activations are recomputed "
                                         "in backward instead of kept (the paper's L'/L)", ge=0, le=1)

    @model_validator(mode="after")
    def _decay_keeps_sign(self) -> Self:
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"lr x weight_decay = {self.lr * self.weight_decay:g} must stay below 1")
        return self

    @model_validator(mode="after")
    def _engine_settings(self) -> Self:
        """A setting the chosen engine would ignore is an error, not a silent no-op."""
        fields = type(self).model_fields
        ignored = {"ort": ("optimizer", "momentum", "checkpoint_fraction"),
                   "torch-mezo": ("optimizer", "momentum", "checkpoint_fraction", "directions", "n_directions",
                                  "clip", "estimator", "adaptive", "direction_scale"),
                   "torch-bp": ("eps", "directions", "n_directions", "clip", "estimator", "adaptive",
                                "direction_scale")}[self.engine]
        if self.estimator == "fzoo":
            if self.adaptive != "none":
                raise ValueError("--adaptive: not used by --estimator fzoo (its update is normalized by the "
                                 "losses' spread)")
            if self.clip is not None:
                raise ValueError("--clip: not used by --estimator fzoo (its update is normalized by the losses' "
                                 "spread)")
            if self.n_directions < 2:
                raise ValueError("--estimator fzoo needs --n-directions of 2 or more (the spread of their losses "
                                 "normalizes the step)")
        if self.optimizer != "momentum":
            ignored += ("momentum",)
        if self.target != "cpu" and self.engine != "ort":
            raise ValueError(f"--engine {self.engine} runs on the CPU only (--provider cpu)")
        given = [flag(k) for k in dict.fromkeys(ignored) if getattr(self, k) != fields[k].default]
        if given:
            raise ValueError(f"{', '.join(given)}: not used by --engine {self.engine}")
        return self

    def resolved(self) -> RunConfig:
        """Paths made absolute (so the run works from any folder) and the schedule's length fixed.
        A split given as a .jsonl file counts as a path when it exists from here; otherwise it
        stays relative to the data folder."""
        def absolute(p: str | None) -> str | None:
            return p if p is None or p.startswith(HUB) else str(Path(p).resolve())

        def file(p: str | None, suffix: str) -> str | None:
            return absolute(p) if p and p.endswith(suffix) and Path(p).exists() else p

        # The schedule's spans are fixed together: at the run's start (schedule_steps not yet set) the
        # time budget spans it too; a resumed run, or one given --schedule-steps, keeps what it has.
        seconds = self.schedule_seconds if self.schedule_steps else self.schedule_seconds or self.time_budget
        return self.model_copy(update={
            "model": absolute(self.model), "data": absolute(self.data), "task": file(self.task, ".toml"),
            "target": file(self.target, ".toml"), "train_split": file(self.train_split, ".jsonl"),
            "eval_split": file(self.eval_split, ".jsonl"), "schedule_steps": self.schedule_steps or self.steps,
            "schedule_seconds": seconds})


ArmName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]  # a folder name, not a path


class CompareSpec(Settings):
    """`ortzo compare`: the experiment, as a .toml file (see configs/compare-*.toml)."""

    title: str = setting("compare", "the plot's title")
    memory_budget: str = setting(..., "peak memory each run may use, e.g. 3GiB; picks each arm's model")
    time_budget: float = setting(..., "seconds of training steps per run", gt=0)
    seeds: list[int] = setting([0, 1, 2], "seeds: one run per arm and seed", min_length=1)
    common: dict[str, Any] = setting({}, "finetune settings every arm shares")
    arms: dict[ArmName, dict[str, Any]] = setting(..., "arm name (letters, digits, . _ -: it names the arm's "
                                                  "folder under --out) -> finetune settings, with `model` (taken) "
                                                  "or `models` (the largest that fits is picked)", min_length=1)
    report_minutes: list[float] = setting([], "wall-clock marks in minutes (steps and the evaluations done on the "
                                          "way): the summary gives each arm's accuracy on the whole evaluation "
                                          "split with the weights it had there (median, min, max over seeds)")


class CompareOptions(Settings):
    spec: str = setting(..., "the experiment: a .toml file (its keys: title, memory_budget, time_budget, seeds, "
                        "common, arms)")
    out: str = setting(..., "folder of the runs, curves.csv, summary.csv, curves.png")
    seeds: list[int] | None = setting(None, "override the spec's seeds", min_length=1)
    time_budget: float | None = setting(None, "override the spec's seconds of steps per run", gt=0)
    memory_budget: str | None = setting(None, "override the spec's memory budget")
    arms: list[str] | None = setting(None, "run and report only these of the spec's arms", min_length=1)


class EvalOptions(Settings):
    """`ortzo eval`: unset options come from the run (for a run folder) or RunConfig's defaults."""

    path: str = setting(..., "trainable model folder, or a finetune run folder")
    task: str | None = setting(None, "task; default: the run's (required for a model folder)")
    template: str | None = setting(None, "a built-in task's named prompt (as for finetune); default: the run's")
    data: str | None = setting(None, "as for finetune; default: the run's")
    eval_split: str | None = setting(None, "as for finetune; default: the run's")
    eval_examples: int | None = setting(None, "as for finetune; default: the run's", ge=1)
    max_length: int | None = setting(None, "as for finetune; default: the run's", ge=2)
    seed: int | None = setting(None, "seed of the evaluation sample; default: the run's", ge=0)
    eval_batch_size: int | None = setting(None, "examples per batch; default: the run's", ge=1,
                                          deprecated_flags=("--batch-size",))
    target: str | None = setting(None, "execution-provider target; default: the run's", flags=("--provider",))
    calibrate: int | None = setting(None, "also report the accuracy after batch calibration: the mean label-word "
                                    "log-probs of N training rows (labels unused) subtracted before the argmax",
                                    ge=1)
    step: int | None = setting(None, "a run's weights after this many steps; default: all logged steps", ge=0)
    adapter: str | None = setting(None, "an .onnx_adapter (ortzo adapter) applied over the model folder's frozen "
                                        "base before scoring")


class FrozenBaseOptions(Settings):
    """A frozen base (ortzo.model.frozen), for `export` and `prepare` alike."""

    groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "frozen base": ("quantize", "block_size", "symmetric", "embedding", "accuracy_level", "widths", "lora")}

    quantize: Literal["none", "int4", "int8"] = setting(
        "none", "a frozen base: the matrices become int4 or int8 constants (ORT's MatMulNBits) and only the vectors "
        "(and --lora's A and B) stay trainable inputs")
    block_size: int = setting(32, "with --quantize: rows of a column that share one scale (a power of 2, 16-256)",
                              ge=16, le=256)
    symmetric: bool = setting(False, "with --quantize: no zero points (less exact, a little smaller)")
    embedding: Literal["int8", "int4", "stored"] = setting(
        "int8", "with --quantize: the token embedding and the lm head quantized (symmetric: their lookup takes no "
                "float zero points), or kept as stored (fp32 or fp16)")
    accuracy_level: int = setting(4, "with --quantize: MatMulNBits' accuracy_level (4: int8 activations, faster "
                                     "and smaller where measured; 0: fp32 compute from dequantized blocks)",
                                  ge=0, le=4)
    widths: Literal["uniform", "source"] = setting(
        "uniform", "with --quantize and a GGUF source: source keeps each matrix the file stores wider than "
                   "--quantize's bits (Q5_0, Q6_K, Q8_0) at int8, as the app's own file does")
    lora: str | None = setting(None, "add LoRA beside the frozen matrices, e.g. r=8,alpha=16,targets=*q_proj,*v_proj "
                                     "(module globs); makes the base frozen like --quantize")

    def specs(self) -> tuple[QuantSpec | None, LoraSpec | None]:
        """The quantization and LoRA these options ask for (None: not asked)."""
        from .model.lora import LoraSpec
        from .model.quantize import QuantSpec

        return (QuantSpec.named(self.quantize, self.block_size, self.symmetric, self.accuracy_level, self.embedding,
                                self.widths),
                LoraSpec.parse(self.lora) if self.lora is not None else None)


class ExportOptions(FrozenBaseOptions):
    model: str = setting(..., "alias (see export/), hub id, local Hugging Face folder or .gguf file")
    out: str = setting(..., "the trainable model folder to write")
    opset: int = setting(17, "ONNX opset of the exported graph", ge=14)
    force: bool = setting(False, "replace an earlier output in --out (a model folder: manifest.json), never "
                          "other files")
    dtype: Literal["float32", "float16"] = setting("float32", "stored weights; float16 trains through fp32 masters")
    verbose: bool = setting(False, "show the third-party exporters' own output and warnings")
    format: Literal["onnx", "ort"] = setting("onnx", "graph formats to write: onnx, or ort to add the graph in ORT "
                                             "format (model.ort and its required_operators.config, for mobile "
                                             "targets) as `ortzo mobile` does")


class MobileOptions(Settings):
    model: str = setting(..., "trainable model folder: adds model.ort (ORT format, for mobile targets and minimal "
                         "builds) and required_operators.config, and records the graph in the manifest")


class PlacementOptions(Settings):
    model: str = setting(..., "trainable model folder")
    providers: list[Literal[PROVIDERS]] = setting(list(PROVIDERS), "mobile providers to report (coreml: its "
                                                  "MLProgram format, as the coreml target runs it; coreml-nn: "
                                                  "NeuralNetwork)", flags=("--provider",), min_length=1,
                                                  renamed={"coreml-mlprogram": "coreml"})
    batch_size: int = setting(1, "batch rows the shape is fixed at (NNAPI, CoreML and QNN need static shapes)", ge=1)
    seq_len: int = setting(64, "tokens per row the shape is fixed at", ge=1)


class PrepareOptions(FrozenBaseOptions):
    model: str = setting(..., "an ONNX model exported by any tool (.onnx; external data beside it is read too), "
                         "or an onnxruntime-genai model folder (genai_config.json: its int4 decoder)")
    out: str = setting(..., "the trainable model folder to write")
    tokenizer: str | None = setting(None, "a tokenizers tokenizer.json to copy into the folder; default: the "
                                    "tokenizer.json beside the model, if there is one")
    force: bool = setting(False, "replace an earlier output in --out (a model folder: manifest.json), never "
                          "other files")


class BakeOptions(Settings):
    """`ortzo bake`: a standard ONNX model (weights as initializers) that Optimum loads."""

    path: str = setting(..., "trainable model folder, or a finetune run folder (its weights)")
    out: str = setting(..., "the folder to write: model.onnx, model.onnx_data, config.json, the tokenizer")
    step: int | None = setting(None, "a run's weights after this many steps; default: all logged steps", ge=0)
    force: bool = setting(False, "replace an earlier output in --out: a bake (model.onnx), never other files")
    adapter: str | None = setting(None, "an .onnx_adapter (ortzo adapter) merged over a model folder's frozen base")
    weights: str | None = setting(None, "a weight file saved over a model folder (the API's Model.save) to bake in "
                                        "place of the folder's own")
    sha256: str | None = setting(None, "with --weights: the sha256 Model.save returned, checked before baking")


class FleetOptions(Settings):
    """`ortzo federate`: the fleet a run is spread over; the run's own settings are finetune's."""

    groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "fleet": ("clients", "rounds", "steps_per_round", "merge", "alpha", "eval_every_rounds", "round_timeout")}
    clients: int = setting(..., "devices in the fleet (simulated with Flower's simulation engine)", ge=1)
    rounds: int = setting(..., "rounds; the run's steps are rounds x steps per round (x clients with --merge "
                               "append)", ge=1)
    steps_per_round: int = setting(1, "MeZO steps each device takes a round", ge=1)
    merge: Literal["average", "append"] = setting(
        "average", "average: every device probes the same steps on its share of the batch, the server averages "
                   "their estimates (one step of the whole fleet's data); append: each device its own steps on "
                   "a whole batch, all kept (clients times the steps a round; noisier on skewed shards)")
    alpha: float | None = setting(None, "non-IID shards: the Dirichlet concentration by label (e.g. 0.5); "
                                        "default: IID", gt=0)
    eval_every_rounds: int = setting(10, "evaluate on the server's examples every N rounds (and after the last)",
                                     ge=1)
    round_timeout: float | None = setting(None, "seconds a round waits for the devices; a later one is left out "
                                                "of that round; default: no limit", gt=0)


class AdapterOptions(Settings):
    """`ortzo adapter`: a run's trained tensors over a frozen base as an ONNX Runtime adapter."""

    path: str = setting(..., "a finetune run folder over a frozen base (or such a model folder: its own tensors)")
    out: str = setting(..., "the adapter file to write (.onnx_adapter)")
    step: int | None = setting(None, "the run's tensors after this many steps; default: all logged steps", ge=0)


class BenchOptions(Settings):
    model: str = setting(..., "trainable model folder")
    batch_size: int = setting(8, "batch rows", ge=1)
    seq_len: int = setting(64, "tokens per row", ge=1)
    repeats: int = setting(5, "timed (forward, step) pairs per direction kind", ge=1)
    directions: list[Literal[KINDS]] = setting(list(KINDS), "direction kinds to time (the flag alone: none)")
    engines: list[Literal[ENGINES]] = setting([], "also time these engines' steps (interleaved in one process) "
                                              "and each one's peak RSS (alone in its own)")
    target: str = setting("cpu", "execution-provider target", flags=("--provider",))
    formats: list[Literal["onnx", "ort"]] = setting([], "also time the ORT engine's step on each graph format "
                                                    "(model.onnx, model.ort) under --provider, interleaved in one "
                                                    "process")
    memory_shapes: list[Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")]] = setting(
        [], "also measure peak RSS of a MeZO step and of inference alone at each BATCHxSEQ shape (e.g. 1x64 4x128), "
        "under --provider, one child process each", flags=("--memory",))
    out: str | None = setting(None, "--memory: also write the rows to this .jsonl file")
    bases: list[str] = setting([], "also compare other folders of the same model (frozen int4/int8 bases, say) with "
                                   "it: forward time interleaved in one process (3 processes), peak RSS of inference "
                                   "and of the default recipe's steps, one process each")


class BenchExportOptions(FrozenBaseOptions):
    """`ortzo bench-export`: peak RSS of a whole export against 0.3 x the fp32 weight bytes + 2 GB;
    with a frozen base, then the peak RSS and time of a few fine-tuning steps."""

    model: str = setting("llama2-7b", "alias or path to export; with --random, the alias whose config the random "
                         "checkpoint takes")
    work: str = setting(..., "folder for the checkpoint and the exports (Llama-2-7B: ~45 GB of disk)")
    random: bool = setting(False, "export a random-weight checkpoint with the alias's config, written as sharded "
                           "safetensors, then check the folder against it and score a truncated copy")
    layers: int | None = setting(None, "--random: decoder layers (default: the config's)", ge=1)
    source_dtype: Literal["float16", "bfloat16"] = setting("float16", "--random: the checkpoint's dtype")
    dtype: Literal["float32", "float16"] = setting("float32", "the folder's weight dtype")
    shard_mib: int = setting(4096, "--random: the checkpoint's shard size", ge=1)
    short_layers: int = setting(2, "--random: layers of the truncated copy scored against PyTorch", ge=1)
    steps: int = setting(0, "with --quantize or --lora: then this many steps of ortzo finetune (batch 1 x 64 tokens, "
                            "the LoRA and vectors trained) in a process of their own: peak RSS, seconds a step and "
                            "the memory model's prediction", ge=0)


class MemoryOptions(Settings):
    """`ortzo memory`: the memory model (ortzo/memory.py) for one model, or inverted for a budget."""

    groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "budget": ("budget",), "validation": ("validate_folders", "default_malloc", "out")}

    model: str | None = setting(None, "alias (see export/), a Hugging Face config.json or a folder holding one, "
                                "or a trainable folder (its hf_config.json); not needed with --budget")
    batch_size: int = setting(16, "batch rows", ge=1)
    seq_len: int = setting(256, "tokens per row", ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = setting("float32", "weights, activations, gradients and "
                                                               "optimizer state (the engines run float32)")
    engine: Literal[ENGINES] | None = setting(None, "show one engine (as finetune's --engine; ort is ort-mezo, "
                                              "torch-bp is bp in the tables); default: all three (--budget's MeZO "
                                              "column: ort unless torch-mezo is given)", deprecated_flags=("--method",),
                                              renamed={"ort-mezo": "ort", "bp": "torch-bp"})
    optimizer: Literal["adamw", "sgd", "momentum"] = setting("adamw", "bp: AdamW, SGD, or SGD with momentum")
    checkpoint_fraction: float | None = setting(None, "bp: fraction of the decoder layers checkpointed (they keep "
                                                "only their input); default: 0, and 1 for --budget's "
                                                "checkpointed column", ge=0, le=1)
    unpadded: bool = setting(False, "batches of full rows: transformers drops the attention mask")
    base: Literal["none", "int4", "int8"] = setting("none", "ort-mezo over a frozen int4/int8 base (`ortzo export "
                                                    "--quantize`, the vectors trained); --budget: its column's base")
    lora_rank: int = setting(0, "with --base: LoRA of this rank on each layer's query and value matrices", ge=0)
    budget: str | None = setting(None, "a memory size (e.g. 17GB, 16GiB): with MODEL, whether it fits; alone, "
                                 "the largest model of each family that fits for bp with and without "
                                 "checkpointing, for MeZO and for ort-mezo over a frozen base (int4 unless "
                                 "--base says), and the paper's setting")
    validate_folders: list[str] | None = setting(None, "trainable folders: predicted vs measured peak RSS of every "
                                                 "method at batch 8 x 64 and 16 x 128 (one child process a row)",
                                                 flags=("--validate",), min_length=1)
    default_malloc: bool = setting(False, "--validate: measure under glibc's default malloc (its slack included)")
    out: str | None = setting(None, "--validate: also write the rows to this .jsonl file")

    @model_validator(mode="after")
    def _model_or_budget(self) -> Self:
        if self.model is None and self.budget is None and self.validate_folders is None:
            raise ValueError("give a MODEL, --budget or --validate")
        return self


def add_options(parser: argparse.ArgumentParser, cls: type[Settings], positional: tuple[str, ...] = (),
                optional_positional: bool = False) -> None:
    """One argparse option per field, with its help and default, under its `groups` section.
    Options left out of the command line are absent from the parsed namespace, so they never
    override a file. A required option is required here too, except a run's (its config file
    or the resumed run may give it)."""
    titled = {title: parser.add_argument_group(title) for title in cls.groups}
    sections = {name: titled[title] for title, names in cls.groups.items() for name in names}
    for name, field in cls.model_fields.items():
        extra = _extra(field)
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
            if get_origin(kind) is list:  # may it be empty? then the flag alone says so
                kwargs["nargs"] = "+" if any(getattr(m, "min_length", 0) for m in field.metadata) else "*"
                kind, _ = _unwrap(get_args(kind)[0])
            if get_origin(kind) is Literal:  # the old names of renamed values are accepted, not shown
                kwargs["choices"] = (*get_args(kind), *extra.get("renamed", {}))
                kwargs["metavar"] = "{" + ",".join(get_args(kind)) + "}"
            elif optional:
                kwargs["type"] = _none_or_str
        section = sections.get(name, parser)
        if name in positional:
            kwargs.pop("metavar", None)
            section.add_argument(name, nargs="?" if optional_positional else None, **kwargs)
            continue
        section.add_argument(flag(name), *extra.get("flags", ()), dest=name,
                             required=field.is_required() and cls is not RunConfig, **kwargs)
        for old in extra.get("deprecated_flags", ()):
            parser.add_argument(old, dest=name, action=_Deprecated, instead=flag(name),
                                **kwargs | {"help": argparse.SUPPRESS})


class _Deprecated(argparse.Action):
    """An old flag name: stores its value under the new name and notes the rename in the
    namespace's `deprecated` list (the CLI warns once its logging is set up)."""

    def __init__(self, *args: Any, instead: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.__dict__.setdefault("deprecated", []).append(
            f"{option_string} is deprecated and goes in the next release: use {self.instead}")


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
