"""PyTorch's names for a model's parameters, and which of them are one tensor (tied).

Read from the model itself, built from its config on the meta device (no memory, no weights):
transformers ties weights by making them one Parameter object, so object identity is the
authority on tying for every family, whatever its config calls it (GPT-2's `wte` and
`lm_head`, OPT's `embed_tokens` under `model.decoder`, GPT-NeoX's untied `embed_out`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TorchParameters:
    shapes: dict[str, tuple[int, ...]]  # each distinct parameter under its first name
    tied: dict[str, str]  # another name of a tied parameter -> its first name (lm_head.weight -> the embedding)

    def canonical(self, name: str) -> str | None:
        """The first name of the parameter called `name`; None if it names no parameter."""
        name = self.tied.get(name, name)
        return name if name in self.shapes else None


def meta_model(config: Any):  # -> transformers.PreTrainedModel
    """The causal LM that `config` describes, as AutoModelForCausalLM builds it (the class Optimum
    exports for text-generation), on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def torch_parameters(config: Any) -> TorchParameters:
    """The parameters of the causal LM that `config` describes (meta_model)."""
    model = meta_model(config)
    first: dict[int, str] = {}
    shapes, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
            shapes[name] = tuple(p.shape)
    return TorchParameters(shapes, tied)
