"""A PyTorch module over the weight store: the trainable folder's model, rebuilt with
transformers from its `hf_config.json`, each parameter a view of the store's array (the
store rewritten in place in PyTorch's layout, contiguous, as a PyTorch model holds it).

So the PyTorch engines start from the very weights the ORT engine does, change them in the
same memory, and a checkpoint of either is one `WeightStore.save`. Nothing is initialised
and then thrown away (the module is built under `no_init_weights`, its empty parameters never
touched), so the process holds one copy of the weights, as ORT's does.

Needs the `export` extra (torch, transformers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import OrtzoError
from ..model.dequantize import frozen_tensors
from ..model.manifest import Manifest, hf_config
from ..tasks.batches import Batch
from ..model.weights import WeightStore


def load_module(model_dir: Path, store: WeightStore) -> nn.Module:
    """The causal LM of `model_dir` in fp32, dropout off, its parameters views of `store`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    manifest = store.manifest
    if any(p.dtype != "float32" for p in manifest.parameters):
        raise OrtzoError(f"{model_dir} stores float16 weights; the PyTorch engines need a float32 export")
    config = AutoConfig.for_model(**hf_config(model_dir))
    _no_dropout(config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="sdpa")
    _bind(model, manifest, store, model_dir)
    return model.eval()


def checkpoint_layers(model: nn.Module, fraction: float) -> int:
    """Activation checkpointing (non-reentrant) of the first round(fraction x L) decoder
    layers: they keep only their input for backward and recompute the rest (the paper's
    L'/L). Takes effect in training mode; returns how many layers it wrapped."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    n = round(fraction * len(layers))
    for layer in layers[:n]:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return n


def _no_dropout(config) -> None:
    """Dropout off, as in the ORT graph (and MeZO's forwards): the engines compute the same
    function and a backprop step can be recomputed exactly on resume."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)


def _bind(model: nn.Module, manifest: Manifest, store: WeightStore, model_dir: Path) -> None:
    """Replace every parameter by a view of the store's array (the store rewritten in PyTorch's
    layout first), or for a frozen base by its matrix read back (model/dequantize.py), with its
    LoRA attached; tie what the model ties; check that nothing was left out."""
    store.to_torch_layout()
    modules = dict(model.named_modules())
    lora = _attach_lora(modules, manifest, store)
    frozen = dict(frozen_tensors(model_dir, manifest)) if manifest.base else {}
    values = {p.name: store.arrays[p.name] for p in manifest.parameters if p.name not in lora} | frozen
    for name, value in values.items():
        owner, _, attr = name.rpartition(".")
        if owner not in modules or attr not in modules[owner]._parameters:
            raise OrtzoError(f"{name} of the trainable folder is not a parameter of the PyTorch model")
        modules[owner]._parameters[attr] = nn.Parameter(torch.from_numpy(value), requires_grad=False)
    model.tie_weights()
    lo = store.buffer.ctypes.data
    hi = lo + store.buffer.nbytes
    outside = [n for n, t in model.named_parameters() if not lo <= t.data_ptr() < hi and n not in frozen]
    if outside:
        raise OrtzoError(f"the trainable folder has no weights for {', '.join(outside)}")


def _attach_lora(modules: dict[str, nn.Module], manifest: Manifest, store: WeightStore) -> set[str]:
    """A frozen base's LoRA on its modules: y = W x + (alpha / r) B (A x), A [r, in] and B
    [out, r] views of the store (PEFT's layout and names, `<module>.lora_A.weight`), as the ORT
    graph computes it. Returns the tensors' names."""
    spec = (manifest.base or {}).get("lora")
    if not spec:
        return set()
    scale = float(spec["alpha"]) / int(spec["r"])
    names = set()
    for module in spec["modules"]:
        linear = modules.get(module)
        if linear is None:
            raise OrtzoError(f"the base's LoRA module {module} is not a module of the PyTorch model")
        for part in ("lora_A", "lora_B"):
            holder = nn.Module()
            holder.weight = nn.Parameter(torch.from_numpy(store.arrays[f"{module}.{part}.weight"]), requires_grad=False)
            linear.add_module(part, holder)
            names.add(f"{module}.{part}.weight")
        linear.register_forward_hook(lambda m, args, out: out + scale * nn.functional.linear(
            nn.functional.linear(args[0], m.lora_A.weight), m.lora_B.weight))
    return names


def scores(model: nn.Module, feeds: dict[str, np.ndarray]) -> torch.Tensor:
    """The scoring head in PyTorch: log-softmax of the LM head at the `score_index` rows, at
    the `score_ids` candidates. Only those rows' logits are computed, as in the ORT graph."""
    base = model.base_model if model.base_model is not model else model.get_decoder()  # Gemma 3: the latter
    hidden = base(input_ids=torch.from_numpy(feeds["input_ids"]),
                  attention_mask=torch.from_numpy(feeds["attention_mask"]),
                  position_ids=torch.from_numpy(feeds["position_ids"]), use_cache=False).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(feeds["score_index"])]
    logits = _finish(model.config, model.get_output_embeddings()(rows))
    return torch.log_softmax(logits.float(), -1).gather(1, torch.from_numpy(feeds["score_ids"]))


def _finish(config, logits: torch.Tensor) -> torch.Tensor:
    """What the causal LM's forward does to the head's output (the graph's head tail does the
    same): Cohere's logit scale, Granite's division, Gemma 2's final soft-cap."""
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits


def word_scores(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[examples, words] label-word scores, as `Batch.candidate_scores`, inside autograd."""
    s = scores(model, batch.feeds)
    if batch.combine is None:
        return s
    return (torch.from_numpy(batch.combine) @ s[:, 0].double()).reshape(len(batch.labels), -1)


def candidate_loss(s: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Cross-entropy over the candidates, mean over the batch (`tasks.objective.loss` in torch)."""
    return -torch.log_softmax(s.double(), 1)[torch.arange(len(labels)), torch.from_numpy(labels)].mean()
