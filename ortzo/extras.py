"""The optional dependencies (pyproject's extras) and the one-line error a missing one gives.

The runtime (`pip install ortzo`) trains and evaluates with onnxruntime, numpy and tokenizers;
everything else is an extra. `require` checks an extra before anything is written (finding a
module does not import it); a `ModuleNotFoundError` that escapes anyway is named by `missing`.
"""
from __future__ import annotations

import importlib.util

from .errors import OrtzoError

# The top-level modules of each extra that ortzo imports.
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx",),
    "export": ("torch", "optimum", "transformers", "onnx", "accelerate", "gguf", "safetensors"),
    "hub": ("datasets",),
    "genai": ("onnxruntime_genai",),
    "cuda": ("cupy",),
    "plots": ("matplotlib",),
    "fleet": ("flwr", "ray"),
}
# A module in several extras names the smallest: onnx alone is the `onnx` extra.
_EXTRA_OF = {m: extra for extra, modules in reversed(EXTRAS.items()) for m in modules}


class MissingExtra(OrtzoError):
    """An optional dependency is not installed: `what` needs `extra`."""

    def __init__(self, extra: str, module: str, what: str = "this") -> None:
        self.extra, self.module = extra, module
        super().__init__(f"{what} needs the {extra!r} extra: pip install 'ortzo[{extra}]' "
                         f"(No module named {module!r})")

    def of(self, what: str) -> MissingExtra:
        """The same error, naming who needed it."""
        return MissingExtra(self.extra, self.module, what)


def require(extra: str, what: str = "this") -> None:
    """Raise MissingExtra unless every module of `extra` is installed."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(extra, module, what)


def missing(e: ModuleNotFoundError) -> MissingExtra | None:
    """The extra a failed import belongs to (None: not an optional dependency, a bug)."""
    module = (e.name or "").split(".")[0]
    return MissingExtra(_EXTRA_OF[module], module) if module in _EXTRA_OF else None
