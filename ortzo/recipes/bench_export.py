"""`ortzo bench-export`: does `ortzo export` stay within 0.3 x the fp32 weight bytes + 2 GB?

With `--random`, the source is a random-weight checkpoint with an alias's config (Llama-2-7B's
by default), written as sharded fp16 or bf16 safetensors a tensor at a time, as the hub ships
them. Without it, the alias or path itself is exported (the packaged GGUFs, say). The export
runs alone in a child process, so its peak RSS (VmHWM) is its own. Then a checker compares the
folder against the source with other readers (safetensors' torch loader, plain file reads):
every tensor present, each one's bytes equal to the source tensor cast to the folder's dtype
(and transposed where the manifest says), the manifest's sha256 that of the file. Last, a
truncated copy (its first layers) is exported and scored against PyTorch on the same weights.

With a frozen base (`--quantize`, `--lora`) the export writes it instead (its quantized tensors
are checked against PyTorch by tests/test_frozen.py, not here), and `--steps N` then runs N steps
of `ortzo finetune` over it at batch 1 x 64 tokens, the LoRA and vectors trained, alone in a
child process: its peak RSS and seconds a step against the memory model's prediction.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OrtzoError
from ..files import sha256_file, write_json
from ..memory import alias_config
from .measure import peak_rss_mib

logger = logging.getLogger(__name__)

SOURCE, FOLDER, SHORT, SHORT_FOLDER = "source", "trainable", "short-source", "short-trainable"
FROZEN, TASK, RUN = "frozen", "task", "run"
TOKENS = 64  # a step's batch: one row of this many tokens
COMPLETE = ".complete"
BUDGET_FRACTION, BUDGET_FIXED = 0.3, 2 * 10**9
CANDIDATES = [1, 2, 3]


def bench_export(model: str, work: Path, random: bool, layers: int | None, source_dtype: str, dtype: str,
                 shard_mib: int, short_layers: int, base: dict[str, Any] | None = None,
                 steps: int = 0) -> dict[str, Any]:
    """Export, check and report; returns the report (also written to `work`/report.json).
    `base`: the frozen-base options (config.FrozenBaseOptions) to export with; then `steps`
    fine-tuning steps are measured too."""
    if steps and base is None:
        raise OrtzoError("--steps measures fine-tuning over a frozen base: give --quantize or --lora too")
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": model, "random": random, "dtype": dtype, "base": base}
    if random:
        config = _random_config(model, layers)
        source = work / SOURCE
        wanted = json.dumps({"config": config, "dtype": source_dtype, "shard_mib": shard_mib}, sort_keys=True)
        done = (source / COMPLETE).read_text() if (source / COMPLETE).is_file() else None
        if done != wanted:  # none yet, or one written for other settings
            logger.info(f"writing a random {source_dtype} checkpoint with {model}'s config "
                        f"({config['num_hidden_layers']} layers) to {source} ...")
            r = _child(["random", str(source), json.dumps(config), source_dtype, str(shard_mib), wanted])
            logger.info(f"  {r['bytes'] / 1e9:.2f} GB in {r['shards']} shards, {r['seconds']:.0f} s, "
                        f"writer peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB")
        report |= {"layers": config["num_hidden_layers"], "source_dtype": source_dtype}
        what = str(source)
    else:
        what = model
    out = work / (FOLDER if base is None else FROZEN)
    logger.info(f"ortzo export {what} --out {out}{' (a frozen base)' if base else ''} (child process) ...")
    e = _child(["export", what, str(out), dtype, json.dumps(base)])
    fp32 = e["fp32_bytes"]
    limit = BUDGET_FRACTION * fp32 + BUDGET_FIXED
    report |= {"export_s": round(e["seconds"], 1), "peak_rss_gib": round(e["peak_rss_mib"] / 1024, 2),
               "fp32_weight_gb": round(fp32 / 1e9, 2), "peak_vs_fp32_weights": round(e["peak_rss_mib"] * 2**20 / fp32, 3),
               "limit_gib": round(limit / 2**30, 2), "within_limit": e["peak_rss_mib"] * 2**20 <= limit}
    logger.info(f"  {e['seconds']:.0f} s, peak RSS {e['peak_rss_mib'] / 1024:.2f} GiB = "
                f"{report['peak_vs_fp32_weights']:.3f} x the {fp32 / 1e9:.2f} GB of fp32 weights "
                f"(limit 0.3 x + 2 GB = {limit / 2**30:.2f} GiB: {'within' if report['within_limit'] else 'OVER'})")
    if base is not None:  # its tensors are quantized: tests/test_frozen.py checks them against PyTorch
        if steps:
            report |= _finetune_report(out, work, steps)
    elif random:
        logger.info("checking the folder against the source ...")
        c = _child(["check", str(out), str(work / SOURCE)])
        report |= {"tensors": c["tensors"], "tensors_equal": c["equal"], "sha256_ok": c["sha256_ok"]}
        logger.info(f"  {c['equal']} of {c['tensors']} source tensors byte-equal in the folder "
                    f"({c['tied']} tied), manifest sha256 {'matches' if c['sha256_ok'] else 'DIFFERS'}")
        short, short_layers = work / SHORT, min(short_layers, config["num_hidden_layers"])
        _child(["truncate", str(work / SOURCE), str(short), str(short_layers)])
        _child(["export", str(short), str(work / SHORT_FOLDER), dtype])
        s = _child(["score", str(work / SHORT_FOLDER), str(short), str(out)])
        report |= {"short_layers": short_layers, "short_max_abs_diff": s["max_abs_diff"],
                   "short_tensors_equal_full": s["equal_to_full"]}
        logger.info(f"  the first {short_layers} layers, exported alone: max |ORT - PyTorch| over scored log-probs "
                    f"{s['max_abs_diff']:.2e}; their tensors equal the full folder's: {s['equal_to_full']}")
    write_json(work / "report.json", report)
    return report


def _finetune_report(folder: Path, work: Path, steps: int) -> dict[str, Any]:
    """`steps` steps of ortzo finetune over the frozen folder, alone in a child process, against
    the memory model's prediction for the same batch."""
    from ..memory import estimate
    from ..model.manifest import Manifest, hf_config
    from .validate import frozen_base

    logger.info(f"{steps} steps of ortzo finetune over it, batch 1 x {TOKENS} tokens (child process) ...")
    f = _child(["finetune", str(folder), str(work), str(steps)])
    predicted = estimate(hf_config(folder), 1, TOKENS, **frozen_base(Manifest.load(folder))).total / 2**20
    r = {"steps": steps, "step_s": round(f["train_seconds"] / steps, 1), "finetune_peak_rss_gib":
         round(f["peak_rss_mib"] / 1024, 2), "predicted_gib": round(predicted / 1024, 2),
         "prediction_error": round(predicted / f["peak_rss_mib"] - 1, 3)}
    logger.info(f"  {r['step_s']} s a step; peak RSS {r['finetune_peak_rss_gib']} GiB, the memory model predicts "
                f"{r['predicted_gib']} GiB ({100 * r['prediction_error']:+.1f} %)")
    return r


def _random_config(model: str, layers: int | None) -> dict[str, Any]:
    config = alias_config(model)
    if config is None:
        raise OrtzoError(f"--random needs an alias with a [config] table in export/ (not {model!r})")
    return config | ({"num_hidden_layers": layers} if layers else {})


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "ortzo.recipes.bench_export", *args], stdout=subprocess.PIPE,
                         text=True)
    if out.returncode != 0:
        raise OrtzoError(f"bench-export: the {args[0]} step failed (exit {out.returncode}); its output is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- child steps

def _write_random(folder: Path, config: dict[str, Any], dtype: str, shard_mib: int, marker: str) -> dict[str, Any]:
    """A random checkpoint as sharded safetensors: one shard's tensors in memory at a time.
    Norm weights are drawn around 1 and matrices at 0.02, as the models are initialised."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from ..model.export.names import meta_model

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = AutoConfig.for_model(**config)
    shapes = {name: p.shape for name, p in meta_model(cfg).named_parameters()}  # tied ones once, as save_pretrained does
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    tdtype = getattr(torch, dtype)
    groups: list[list[str]] = [[]]  # the shards' tensor names
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * tdtype.itemsize
        if size and size + nbytes > shard_mib * 2**20:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    total = len(groups)
    weight_map, written = {}, 0
    for k, group in enumerate(groups):
        tensors = {}
        for name in group:
            x = torch.empty(shapes[name], dtype=torch.float32)
            if "norm" in name or name.endswith("ln_f.weight"):
                x.normal_(1.0, 0.1, generator=gen)
            else:
                x.normal_(0.0, 0.02, generator=gen)
            tensors[name] = x.to(tdtype)
            del x
        file = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        written += sum(v.numel() * v.element_size() for v in tensors.values())
        weight_map |= {n: file for n in group}
        del tensors
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": written}, "weight_map": weight_map})
    cfg.dtype = tdtype
    cfg.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(61)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(folder)
    (folder / COMPLETE).write_text(marker)  # last: a killed writer leaves no marker
    return {"bytes": written, "shards": total, "seconds": time.perf_counter() - t}


def _export(what: str, out: Path, dtype: str, base: dict[str, Any] | None) -> dict[str, Any]:
    from ..config import FrozenBaseOptions
    from ..memory import Arch, parameter_count
    from ..model.export import export_model
    from ..model.manifest import hf_config

    quant, lora = FrozenBaseOptions.build(base).specs() if base else (None, None)
    t = time.perf_counter()
    m = export_model(what, out, dtype=dtype, force=True, say=lambda line: print(line, file=sys.stderr, flush=True),
                     quant=quant, lora=lora)
    fp32 = 4 * (parameter_count(Arch.from_config(hf_config(out))) if base else sum(p.size for p in m.parameters))
    return {"seconds": time.perf_counter() - t, "fp32_bytes": fp32}


def _finetune(folder: Path, work: Path, steps: int) -> dict[str, Any]:
    """Steps over a task whose every prompt is TOKENS words of the random checkpoint's
    vocabulary (w0 ... w60), the LoRA and vectors trained; one evaluation row."""
    from ..config import RunConfig
    from .finetune import start

    rng = np.random.default_rng(0)
    (work / TASK).mkdir(exist_ok=True)
    for split in ("train", "validation"):
        rows = [{"text": " ".join(f"w{i}" for i in rng.integers(3, 61, TOKENS)), "label": int(rng.integers(2))}
                for _ in range(16)]
        (work / TASK / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / TASK / "task.toml").write_text('template = "{text}"\nlabel_words = [" w1", " w2"]\ndata = "."\n')
    shutil.rmtree(work / RUN, ignore_errors=True)
    cfg = RunConfig.build({"model": str(folder), "task": str(work / TASK / "task.toml"), "steps": steps,
                           "batch_size": 1, "max_length": TOKENS, "eval_examples": 1, "include": ["*"]})
    return start(cfg, work / RUN)


def _check(folder: Path, source: Path) -> dict[str, Any]:
    """Each source tensor against the folder's bytes, read here with safetensors' torch loader
    and plain file reads (not ortzo's readers)."""
    import torch
    from safetensors import safe_open

    from ..model.manifest import Manifest

    m = Manifest.load(folder)
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    params = {p.name: p for p in m.parameters}
    equal = tied = 0
    with open(folder / m.weights, "rb") as f:
        for name, file in index.items():
            p = params.get(m.tied.get(name, name))
            if p is None:
                continue
            tied += name in m.tied
            with safe_open(str(source / file), framework="pt") as s:
                t = s.get_tensor(name).to(torch.float32)
            want = (t.T if p.transposed else t).contiguous().numpy().astype(p.dtype)
            f.seek(p.offset)
            equal += f.read(p.nbytes) == want.tobytes()
            del t, want
    return {"tensors": len(index), "equal": equal, "tied": tied,
            "sha256_ok": sha256_file(folder / m.weights) == m.weights_sha256}


def _truncate(source: Path, short: Path, layers: int) -> dict[str, Any]:
    """The source's first `layers` decoder layers and everything outside the layers."""
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.rmtree(short, ignore_errors=True)
    short.mkdir(parents=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {}
    for name, file in index.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m is None or int(m.group(1)) < layers:
            with safe_open(str(source / file), framework="pt") as s:
                keep[name] = s.get_tensor(name)
    save_file(keep, str(short / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text()) | {"num_hidden_layers": layers}
    write_json(short / "config.json", config)
    for p in source.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(p, short / p.name)
    return {"tensors": len(keep)}


def _score(folder: Path, short: Path, full: Path) -> dict[str, Any]:
    """The short folder's scores against PyTorch's log-probs of the same checkpoint, and its
    tensors' bytes against the full folder's."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.manifest import Manifest
    from ..model.session import ScoringSession
    from ..model.targets import load_target
    from ..model.weights import WeightStore
    from ..tasks.batches import collate

    store = WeightStore.load(folder, Manifest.load(folder))
    session = ScoringSession(folder, store, load_target("cpu"))
    feeds = collate([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0, np.array(CANDIDATES))
    got = session(feeds)
    del session
    model = AutoModelForCausalLM.from_pretrained(short, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**{k: torch.tensor(feeds[k]) for k in ("input_ids", "attention_mask", "position_ids")}).logits
    want = torch.log_softmax(logits[:, -1], -1)[:, CANDIDATES].numpy()
    del model
    full_m = Manifest.load(full)
    full_p = {p.name: p for p in full_m.parameters}
    same = True
    with open(full / full_m.weights, "rb") as f:
        for p in store.manifest.parameters:
            q = full_p[p.name]
            f.seek(q.offset)
            same &= q.shape == p.shape and f.read(q.nbytes) == store.arrays[p.name].tobytes()
    return {"max_abs_diff": float(np.abs(got - want).max()), "equal_to_full": bool(same)}


if __name__ == "__main__":
    what, *a = sys.argv[1:]
    if what == "random":
        result = _write_random(Path(a[0]), json.loads(a[1]), a[2], int(a[3]), a[4])
    elif what == "export":
        result = _export(a[0], Path(a[1]), a[2], json.loads(a[3]))
    elif what == "finetune":
        result = _finetune(Path(a[0]), Path(a[1]), int(a[2]))
    elif what == "check":
        result = _check(Path(a[0]), Path(a[1]))
    elif what == "truncate":
        result = _truncate(Path(a[0]), Path(a[1]), int(a[2]))
    else:
        result = _score(Path(a[0]), Path(a[1]), Path(a[2]))
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))
