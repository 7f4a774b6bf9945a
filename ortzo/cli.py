"""`ortzo export | finetune | eval | bench`. Problems a user can fix get one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .directions import KINDS
from .errors import OrtzoError
from .finetune import FinetuneConfig


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except OrtzoError as e:
        print(f"ortzo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ortzo: interrupted; the step log and checkpoints are intact (--resume continues)", file=sys.stderr)
        return 130


def _export(a: argparse.Namespace) -> None:
    from .export import export_model

    m = export_model(a.model, a.out, opset=a.opset, force=a.force, dtype=a.dtype)
    print(f"wrote {a.out}: {len(m.parameters)} parameters, {sum(p.size for p in m.parameters):,} weights, "
          f"{m.weights_bytes / 2**20:.1f} MiB")


def _finetune(a: argparse.Namespace) -> None:
    from .finetune import finetune

    names = {f.name for f in fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(a).items() if k in names and v is not None})
    result = finetune(cfg, resume=a.resume)
    print(json.dumps(result))


def _eval(a: argparse.Namespace) -> None:
    from .evaluation import evaluate_folder

    r = evaluate_folder(Path(a.path), a.task, a.data, a.eval_examples, a.batch_size, a.target, a.max_length)
    print(json.dumps(r))


def _bench(a: argparse.Namespace) -> None:
    from .bench import bench_step

    bench_step(Path(a.model), a.batch_size, a.seq_len, a.repeats, a.target, a.directions)


def _bench_export(a: argparse.Namespace) -> None:
    from .bench import bench_export

    bench_export(Path(a.work), a.layers, a.hidden, a.intermediate, a.vocab)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ortzo", description=__doc__)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export a causal LM to a trainable model folder")
    e.add_argument("model", help="alias (see export/), hub id, local HF folder or .gguf file")
    e.add_argument("--out", required=True)
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--force", action="store_true", help="replace a non-empty --out")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored weights; fp16 trains through fp32 master copies")
    e.set_defaults(func=_export)

    f = sub.add_parser("finetune", help="fine-tune with MeZO through ONNX Runtime")
    f.add_argument("model", help="trainable model folder (from ortzo export)")
    f.add_argument("--task", required=True, help="sst2, boolq, rte, sst5, or a task .toml")
    f.add_argument("--data", help="folder of train.jsonl/validation.jsonl, or a datasets hub name")
    f.add_argument("--out", required=True, help="run folder: step log, checkpoints, metrics, plot")
    f.add_argument("--steps", type=int)
    f.add_argument("--batch-size", type=int)
    f.add_argument("--lr", type=float)
    f.add_argument("--eps", type=float)
    f.add_argument("--schedule", choices=["constant", "linear"])
    f.add_argument("--weight-decay", type=float)
    f.add_argument("--directions", choices=KINDS)
    f.add_argument("--n-directions", type=int, help="directions per step (q)")
    f.add_argument("--clip", type=float, help="clip the projected gradient to [-clip, clip]")
    f.add_argument("--include", nargs="+", help="glob patterns of parameters to train")
    f.add_argument("--exclude", nargs="+", help="glob patterns of parameters to freeze")
    f.add_argument("--train-examples", type=int)
    f.add_argument("--k-shot", type=int, help="k training examples per class instead")
    f.add_argument("--eval-examples", type=int, help="default: the whole validation split")
    f.add_argument("--dev-examples", type=int, help="also evaluate on N train-split rows kept out of training")
    f.add_argument("--eval-every", type=int)
    f.add_argument("--eval-batch-size", type=int)
    f.add_argument("--checkpoint-every", type=int)
    f.add_argument("--max-length", type=int)
    f.add_argument("--seed", type=int)
    f.add_argument("--provider", "--target", dest="target", help="target name (targets/) or .toml file")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    f.set_defaults(func=_finetune)

    v = sub.add_parser("eval", help="accuracy of a model folder (zero-shot) or a run folder")
    v.add_argument("path", help="trainable model folder or finetune run folder")
    v.add_argument("--task", help="default: the run's task")
    v.add_argument("--data")
    v.add_argument("--eval-examples", type=int)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--max-length", type=int, default=256)
    v.add_argument("--provider", "--target", dest="target", default="cpu")
    v.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="forward vs MeZO step time and peak memory")
    b.add_argument("model", help="trainable model folder")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--seq-len", type=int, default=64)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--directions", nargs="+", choices=KINDS, default=list(KINDS))
    b.add_argument("--provider", "--target", dest="target", default="cpu")
    b.set_defaults(func=_bench)

    x = sub.add_parser("bench-export", help="peak memory of the export pass on a random multi-GB Llama")
    x.add_argument("--work", required=True, help="folder for the random model and its exports (~7 GB)")
    x.add_argument("--layers", type=int, default=19)  # 2.2 GB of fp32: past the 2 GB protobuf limit
    x.add_argument("--hidden", type=int, default=1536)
    x.add_argument("--intermediate", type=int, default=4096)
    x.add_argument("--vocab", type=int, default=32000)
    x.set_defaults(func=_bench_export)
    return p


if __name__ == "__main__":
    sys.exit(main())
