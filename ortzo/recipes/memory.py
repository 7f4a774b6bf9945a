"""`ortzo memory`: the memory model's terms for one model (and whether it fits --budget), or for
--budget alone the largest model of each family that fits, and the paper's setting."""
from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Any

from ..config import MemoryOptions
from ..errors import OrtzoError
from ..memory import (METHODS, PAPER, SIZES, Arch, Estimate, alias_config, aliases, estimate, largest_fitting,
                      parse_size)
from ..model.manifest import HF_CONFIG

OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD", "momentum": "SGD with momentum"}
METHOD = {"ort": "ort-mezo", "torch-mezo": "torch-mezo", "torch-bp": "bp"}  # an engine's name in the memory model


def run(o: MemoryOptions) -> None:
    if o.validate_folders is not None:
        from .validate import validate

        validate([Path(m) for m in o.validate_folders], Path(o.out) if o.out else None, o.default_malloc)
    elif o.model is None:
        show_budget(o)
    else:
        name, config = load_config(o.model)
        show_estimates(name, Arch.from_config(config), o)


def load_config(model: str) -> tuple[str, dict[str, Any]]:
    """(a name to show, the HF config) of an export/ alias, a config.json, or a folder holding
    one (a trainable folder's hf_config.json, a Hugging Face folder's config.json)."""
    path = Path(model)
    if path.is_dir():
        found = [path / n for n in (HF_CONFIG, "config.json") if (path / n).is_file()]
        if not found:
            raise OrtzoError(f"{model}: the folder holds no {HF_CONFIG} or config.json")
        return path.name, _read_json(found[0])
    if path.suffix == ".json":
        if not path.is_file():
            raise OrtzoError(f"config file not found: {model}")
        return path.stem, _read_json(path)
    config = alias_config(model)
    if config is None:
        raise OrtzoError(f"unknown model {model!r}: not an alias ({', '.join(aliases())}), "
                         "a config.json or a folder holding one")
    return model, config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise OrtzoError(f"bad config file {path}: {e}") from None
    if not isinstance(d, dict):
        raise OrtzoError(f"bad config file {path}: expected a JSON object")
    return d


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def show_estimates(name: str, arch: Arch, o: MemoryOptions) -> None:
    """One column per method, one row per term; then bp's activations by kind and by layer."""
    methods = [METHOD[o.engine]] if o.engine else [m for m in METHODS if not (m == "ort-mezo" and o.dtype == "bfloat16")]
    fraction = o.checkpoint_fraction or 0.0
    if o.base != "none" and "ort-mezo" not in methods:
        raise OrtzoError("--base is ort-mezo's: a frozen base is what ortzo's engine trains over")
    frozen = {"base": o.base, "lora_rank": o.lora_rank}
    estimates = {m: estimate(arch, o.batch_size, o.seq_len, method=m, optimizer=o.optimizer,
                             checkpoint_fraction=fraction, dtype=o.dtype, padded=not o.unpadded,
                             **(frozen if m == "ort-mezo" else {})) for m in methods}
    if o.base != "none":
        estimates = {(f"ort-mezo {o.base}" if m == "ort-mezo" else m): e for m, e in estimates.items()}
        methods = list(estimates)
    params = next(iter(estimates.values())).params
    print(f"{name} ({arch.family}): {params:,} parameters; batch {o.batch_size} x seq {o.seq_len}, {o.dtype}, "
          f"{'full rows' if o.unpadded else 'padded batches'}")
    terms = list(dict.fromkeys(t for e in reversed(estimates.values()) for t in e.terms))
    print(f"{'term':<26}" + "".join(f"{m:>14}" for m in methods))
    for t in terms:
        print(f"{t:<26}" + "".join(f"{size(e.terms[t]) if t in e.terms else '':>14}" for e in estimates.values()))
    print(f"{'peak':<26}" + "".join(f"{size(e.total):>14}" for e in estimates.values()))
    print(f"{'  at':<26}" + "".join(f"{e.phase:>14}" for e in estimates.values()))
    if o.budget is not None:
        budget = parse_size(o.budget)
        print(f"{'fits ' + o.budget:<26}" + "".join(f"{'yes' if e.total <= budget else 'no':>14}"
                                                    for e in estimates.values()))
    if "bp" in estimates:
        _show_activations(estimates["bp"], arch, o)


def _show_activations(e: Estimate, arch: Arch, o: MemoryOptions) -> None:
    print(f"\nbp ({OPTIMIZERS[o.optimizer]}, {e.checkpointed} of {arch.layers} layers checkpointed): "
          f"activations kept for backward, by kind")
    for kind, n in sorted(e.activations.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<24}{size(n):>14}")
    print("per decoder layer")
    start = 0
    for (checkpointed, n), run in groupby(((i < e.checkpointed, b) for i, b in enumerate(e.layer_bytes))):
        count = len(list(run))
        span = f"layer {start}" if count == 1 else f"layers {start}-{start + count - 1}"
        print(f"  {span:<24}{size(n):>14} each{' (checkpointed: its input)' if checkpointed else ''}")
        start += count


def show_budget(o: MemoryOptions) -> None:
    """Per family: the largest size that fits for bp without and with checkpointing and for
    MeZO, and the ratio of their parameters; then the paper's setting."""
    budget = parse_size(o.budget)
    fraction = 1.0 if o.checkpoint_fraction is None else o.checkpoint_fraction
    mezo = "torch-mezo" if o.engine == "torch-mezo" else "ort-mezo"
    common = {"dtype": o.dtype, "padded": not o.unpadded}
    base = o.base if o.base != "none" else "int4"
    columns = {"bp": {"method": "bp", "optimizer": o.optimizer},
               f"bp, ckpt {fraction:g}": {"method": "bp", "optimizer": o.optimizer, "checkpoint_fraction": fraction},
               mezo: {"method": mezo},
               f"ort-mezo, {base} base": {"method": "ort-mezo", "base": base, "lora_rank": o.lora_rank}}
    print(f"budget {o.budget} = {size(budget)}; batch {o.batch_size} x seq {o.seq_len}, {o.dtype}, "
          f"bp with {OPTIMIZERS[o.optimizer]}; largest size that fits (its predicted peak)")
    print(f"{'family':<10}" + "".join(f"{c:>28}" for c in columns) + f"{'MeZO/bp':>9}{'MeZO/ckpt':>10}"
          f"{base + '/bp':>9}")
    for family, sizes in SIZES.items():
        fits = [largest_fitting(budget, sizes, o.batch_size, o.seq_len, **common, **how) for how in columns.values()]
        cells = [f"{n}{'*' if n == sizes[-1] else ''} ({size(e.total)})" if n else "none" for n, e in
                 (fit or (None, None) for fit in fits)]
        ratios = [f"{fits[i][1].params / fit[1].params:.1f}x" if fit and fits[i] else "-"
                  for i, fit in ((2, fits[0]), (2, fits[1]), (3, fits[0]))]
        print(f"{family:<10}" + "".join(f"{c:>28}" for c in cells) + f"{ratios[0]:>9}{ratios[1]:>10}{ratios[2]:>9}")
    print("* the family's largest listed size: a larger one might fit too")
    show_paper(budget, o.budget)


def show_paper(budget: int, label: str) -> None:
    """The paper's comparison (BP on GPT-2-medium vs MeZO on Llama-2-7B/13B at about 17 GB)
    under this model, with the assumptions that reproduce it."""
    p = PAPER
    print(f"\nthe paper's setting (Katti et al., arXiv 2511.11362), batch {p.batch} x seq {p.seq}, at {label}:")
    rows = [(f"bp {OPTIMIZERS[p.bp_optimizer]} {p.bp_dtype}", p.bp_model,
             estimate(alias_config(p.bp_model), p.batch, p.seq, method="bp", optimizer=p.bp_optimizer,
                      dtype=p.bp_dtype))]
    rows += [(f"MeZO (torch-mezo) {p.mezo_dtype}", m,
              estimate(alias_config(m), p.batch, p.seq, method="torch-mezo", dtype=p.mezo_dtype))
             for m in p.mezo_models]
    for how, model, e in rows:
        spare = budget - (e.total - e.terms["weights"])  # what the weights may take
        verdict = "fits" if e.total <= budget else f"does not fit: would need <= {spare / e.params:.2f} bytes a weight"
        print(f"  {how:<32}{model:<14}{e.params / 1e9:>6.2f} B params{size(e.total):>13}  {verdict}")
    bp = rows[0][2]
    for _, model, e in rows[1:]:
        print(f"  {model} / {p.bp_model}: {e.params / bp.params:.0f}x the parameters")
