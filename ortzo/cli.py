"""`ortzo export | prepare | mobile | placement | finetune | eval | bake | adapter | compare | bench | bench-export`
(and `memory`, `targets`).

Options come from the settings models in `config`. Every problem a user can cause (a bad
option value, a missing or corrupt file, an unwritable or full disk, a missing extra) is one
line on stderr and exit code 2. Progress and notes go to the `ortzo` logger, on stderr
(--quiet: warnings only, no progress bars); stdout carries only a command's result.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, config
from .config import (BenchExportOptions, BenchOptions, CompareOptions, CompareSpec, EvalOptions, ExportOptions,
                     RunConfig)
from .errors import OrtzoError
from .extras import missing, require
from .output import LEVELS, configure

logger = logging.getLogger(__name__)
# The extra each command needs beyond the runtime, checked before it starts.
NEEDS = {"export": "export", "bench-export": "export", "prepare": "onnx", "bake": "onnx", "mobile": "onnx",
         "placement": "onnx"}


def main(argv: list[str] | None = None) -> int:
    command = "ortzo"
    try:
        args = _parser().parse_args(argv)
        configure(args.log_level, args.quiet)
        for line in getattr(args, "deprecated", ()):
            logger.warning(line)
        command = f"ortzo {args.command}"
        if args.command in NEEDS:
            require(NEEDS[args.command], command)
        return args.func(args) or 0
    except ModuleNotFoundError as e:  # an optional dependency that only this path imports
        if (m := missing(e)) is None:
            raise
        return _fail(str(m.of(command)))
    except OrtzoError as e:
        return _fail(str(e))
    except OSError as e:  # a read-only folder, a full disk, a file that vanished
        return _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
    except KeyboardInterrupt:
        print("ortzo: interrupted; the step log and checkpoints are intact (--resume continues)", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"ortzo: error: {message}", file=sys.stderr)
    return 2


def _export(a: argparse.Namespace) -> None:
    from .model.export import export_model

    o = ExportOptions.build(config.given(a, ExportOptions))
    quant, lora = o.specs()
    m = export_model(o.model, o.out, opset=o.opset, force=o.force, dtype=o.dtype, verbose=o.verbose,
                     graph_format=o.format, quant=quant, lora=lora)
    logger.info(f"wrote {o.out}: {_trainable(m)}")


def _trainable(m) -> str:  # m: Manifest
    """What a written folder trains, and its frozen base if it has one."""
    widths = " (wider GGUF matrices int8)" if m.base.get("widths") == "source" else ""
    base = f"; frozen base {m.base['quantize']}{widths}, {m.base['data_bytes'] / 2**20:.1f} MiB" if m.base else ""
    return (f"{len(m.parameters)} trainable parameters, {sum(p.size for p in m.parameters):,} weights, "
            f"{m.weights_bytes / 2**20:.1f} MiB{base}")


def _mobile(a: argparse.Namespace) -> None:
    from .model.mobile import OPERATORS, add_ort_graph, required_operators

    o = config.MobileOptions.build(config.given(a, config.MobileOptions))
    m = add_ort_graph(o.model)
    ops = sum(len(names) for names in required_operators(o.model).values())
    inside = "trained tensors stay inputs, the frozen base is inside" if m.base else "weights stay inputs"
    logger.info(f"wrote {Path(o.model) / m.ort_graph} ({(Path(o.model) / m.ort_graph).stat().st_size / 2**20:.1f} MiB, "
                f"{inside}) and {OPERATORS} ({ops} operator types); targets with format = \"ort\" load it")


def _placement(a: argparse.Namespace) -> None:
    from .model.placement import report

    o = config.PlacementOptions.build(config.given(a, config.PlacementOptions))
    report(Path(o.model), list(o.providers), o.batch_size, o.seq_len)


def _prepare(a: argparse.Namespace) -> None:
    from .model.manifest import Manifest
    from .model.prepare import prepare

    o = config.PrepareOptions.build(config.given(a, config.PrepareOptions))
    quant, lora = o.specs()
    m = Manifest.load(prepare(o.model, o.out, tokenizer=o.tokenizer, force=o.force, quant=quant, lora=lora))
    logger.info(f"wrote {o.out}: {_trainable(m)}; inputs {', '.join(m.inputs)}; outputs {', '.join(m.outputs)}")


def _finetune(a: argparse.Namespace) -> None:
    from .recipes import finetune

    given = config.given(a, RunConfig)
    if a.resume:
        if a.config:
            raise OrtzoError("--config starts a new run; a resumed run takes its settings from its own config.json "
                             "(pass changes as options)")
        result = finetune.resume(a.out, given)
    else:
        from_file = config.read_file(a.config) if a.config else {}
        where = f"{a.config}: " if a.config else ""
        result = finetune.start(RunConfig.build(from_file | given, where), a.out)
    print(json.dumps(result))


def _federate(a: argparse.Namespace) -> None:
    from .recipes.federate import federate, settings

    cfg, fleet, timeout = settings(config.given(a, RunConfig) | config.given(a, config.FleetOptions))
    print(json.dumps(federate(cfg, fleet, a.out, resume=a.resume, round_timeout=timeout)))


def _eval(a: argparse.Namespace) -> None:
    from .recipes.evaluate import evaluate_path

    print(json.dumps(evaluate_path(EvalOptions.build(config.given(a, EvalOptions)))))


def _bake(a: argparse.Namespace) -> None:
    from .model.bake import GENAI_CONFIG
    from .recipes.bake import bake

    o = config.BakeOptions.build(config.given(a, config.BakeOptions))
    m = bake(o.path, o.out, step=o.step, force=o.force, say=logger.info, adapter=o.adapter, weights=o.weights,
             sha256=o.sha256)
    size = sum(p.stat().st_size for p in Path(o.out).iterdir())
    load = "onnxruntime.InferenceSession(out/model.onnx)" if m.source.get("kind") == "onnx" else \
        "ORTModelForCausalLM.from_pretrained(out), og.Model(out)" if (Path(o.out) / GENAI_CONFIG).exists() else \
        "ORTModelForCausalLM.from_pretrained(out, use_cache=False)"
    logger.info(f"wrote {o.out}: {size / 2**20:.1f} MiB ({load})")


def _adapter(a: argparse.Namespace) -> None:
    from .recipes.adapter import adapter

    o = config.AdapterOptions.build(config.given(a, config.AdapterOptions))
    r = adapter(o.path, o.out, step=o.step, say=logger.info)
    logger.info(f"wrote {o.out}: {r['tensors']} tensors, {r['weights']:,} weights, {r['bytes'] / 1024:.1f} KiB, "
                f"for the base in {r['base']}")


def _compare(a: argparse.Namespace) -> None:
    from .recipes.compare import compare

    o = CompareOptions.build(config.given(a, CompareOptions))
    changes = {k: v for k, v in o.model_dump().items() if v is not None and k in ("seeds", "time_budget",
                                                                                   "memory_budget")}
    spec = CompareSpec.build(config.read_file(o.spec) | changes, f"{o.spec}: ")
    if o.arms:
        unknown = [a for a in o.arms if a not in spec.arms]
        if unknown:
            raise OrtzoError(f"{o.spec} has no arm {', '.join(map(repr, unknown))}; its arms: {', '.join(spec.arms)}")
        spec = spec.model_copy(update={"arms": {a: spec.arms[a] for a in o.arms}})
    compare(spec, Path(o.out))


def _bench(a: argparse.Namespace) -> None:
    from .recipes.bench import bench_bases, bench_engines, bench_formats, bench_memory, bench_step

    o = BenchOptions.build(config.given(a, BenchOptions))
    if o.out and not o.memory_shapes:
        raise OrtzoError("--out: only with --memory (it holds the memory rows)")
    if o.directions:
        bench_step(Path(o.model), o.batch_size, o.seq_len, o.repeats, o.target, list(o.directions))
    if o.engines:
        bench_engines(Path(o.model), o.batch_size, o.seq_len, o.repeats, list(o.engines))
    if o.formats:
        bench_formats(Path(o.model), o.batch_size, o.seq_len, o.repeats, o.target, list(o.formats))
    if o.memory_shapes:
        bench_memory(Path(o.model), list(o.memory_shapes), o.target, Path(o.out) if o.out else None)
    if o.bases:
        bench_bases(Path(o.model), [Path(b) for b in o.bases], o.batch_size, o.seq_len, o.repeats)


def _bench_export(a: argparse.Namespace) -> None:
    from .recipes.bench_export import bench_export

    o = BenchExportOptions.build(config.given(a, BenchExportOptions))
    base = o.model_dump(include=set(config.FrozenBaseOptions.model_fields))
    bench_export(o.model, Path(o.work), o.random, o.layers, o.source_dtype, o.dtype, o.shard_mib, o.short_layers,
                 base if o.quantize != "none" or o.lora else None, o.steps)


def _targets(a: argparse.Namespace) -> None:
    from .model.targets import known_targets, load_target

    print(f"{'target':<11} {'format':<6} {'weights':<7} {'runs here':<9} providers / what it is")
    for name in known_targets():
        t = load_target(name)
        why = t.unavailable()
        print(f"{name:<11} {t.format:<6} {t.device:<7} {'yes' if why is None else 'no':<9} "
              f"{' > '.join(t.providers)}: {t.description}")
        if why:
            print(f"{'':<36}{why}")


def _memory(a: argparse.Namespace) -> None:
    from .recipes.memory import run

    run(config.MemoryOptions.build(config.given(a, config.MemoryOptions)))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 like every other error."""

    def error(self, message: str) -> NoReturn:
        raise OrtzoError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ortzo", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.set_defaults(log_level="info", quiet=False)
    _output_options(p)
    sub = p.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser, dest="command")

    def command(name: str, help: str, func: Callable[[argparse.Namespace], Any]) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        _output_options(c)
        return c

    e = command("export", "export a causal LM to a trainable model folder", _export)
    config.add_options(e, ExportOptions, positional=("model",))

    mo = command("mobile", "add the graph in ORT format (model.ort, for mobile targets) to a trainable model folder",
                 _mobile)
    config.add_options(mo, config.MobileOptions, positional=("model",))

    pl = command("placement", "which nodes of the trainable graph each mobile provider takes, and what falls "
                 "back to the CPU", _placement)
    config.add_options(pl, config.PlacementOptions, positional=("model",))

    r = command("prepare", "make an ONNX model exported by any tool a trainable model folder", _prepare)
    config.add_options(r, config.PrepareOptions, positional=("model",))

    f = command("finetune", "fine-tune with MeZO through ONNX Runtime", _finetune)
    config.add_options(f, RunConfig, positional=("model",), optional_positional=True)
    run = f.add_argument_group("run folder")
    run.add_argument("--out", required=True, help="run folder: config, step log, metrics, checkpoints, plot")
    run.add_argument("--config", help="a .toml or .json file of settings (a run's config.json works); "
                                    "options given here override it")
    run.add_argument("--resume", action="store_true",
                   help="continue the run in --out; options change only the settings a run may change on resume")

    fe = command("federate", "MeZO on a simulated fleet (Flower): seeds and projected gradients on the wire, "
                 "one global step log", _federate)
    config.add_options(fe, RunConfig, positional=("model",))
    config.add_options(fe, config.FleetOptions)
    fed = fe.add_argument_group("run folder")
    fed.add_argument("--out", required=True, help="run folder: config, the global step log, rounds.csv")
    fed.add_argument("--resume", action="store_true", help="continue the fleet run in --out (the same options)")

    v = command("eval", "accuracy of a model folder (zero-shot) or of a run's weights", _eval)
    config.add_options(v, EvalOptions, positional=("path",))

    k = command("bake", "a model folder or a run's weights as a standard ONNX model for onnxruntime and Optimum",
                _bake)
    config.add_options(k, config.BakeOptions, positional=("path",))

    ad = command("adapter", "a run's trained tensors over a frozen base as an ONNX Runtime adapter (.onnx_adapter)",
                 _adapter)
    config.add_options(ad, config.AdapterOptions, positional=("path",))

    c = command("compare", "the same-budget experiment: arms x seeds for a time budget, curves as CSV and PNG",
                _compare)
    config.add_options(c, CompareOptions, positional=("spec",))

    b = command("bench", "MeZO step vs forward time (interleaved in one process) and peak memory", _bench)
    config.add_options(b, BenchOptions, positional=("model",))

    x = command("bench-export", "peak memory of a whole export (a random-weight Llama-2-7B with --random)",
                _bench_export)
    config.add_options(x, BenchExportOptions, positional=("model",), optional_positional=True)

    command("targets", "the execution-provider targets (targets/*.toml) and whether this onnxruntime build "
            "runs each here", _targets)

    m = command("memory", "the memory model: per-term bytes of ort-mezo, torch-mezo and bp, or with --budget "
                "the largest model that fits", _memory)
    config.add_options(m, config.MemoryOptions, positional=("model",), optional_positional=True)
    return p


def _output_options(parser: argparse.ArgumentParser) -> None:
    """--quiet and --log-level, given before the command or after it."""
    g = parser.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                   help="warnings and errors only, no progress bars (TQDM_DISABLE=1 hides only the bars)")
    g.add_argument("--log-level", choices=LEVELS, default=argparse.SUPPRESS,
                   help="the least severe messages shown on stderr (default: info)")


if __name__ == "__main__":
    sys.exit(main())
