"""An ONNX Runtime inference session over the weight store, bound once with IOBinding.

On a host target the weight inputs are OrtValues over the store's NumPy memory (zero-copy);
on a CUDA target they are pointers into one device allocation (`device.DeviceWeights`). Either
way they are bound once and each call binds only the batch. Nothing here knows about tasks or
training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import OrtzoError
from .manifest import Manifest
from .targets import Target
from .weights import WeightStore


class ScoringSession:
    """`graph`: the file to load (default: the folder's graph for the target's format), e.g.
    the full-logits graph, which takes the same weight inputs. `device`: weights already on
    the target's device (share one between sessions: they then train the same buffers)."""

    def __init__(self, folder: str | Path, store: WeightStore, target: Target, graph: str | None = None,
                 device=None) -> None:
        target.check_available()
        m = store.manifest
        path = Path(folder) / (graph or graph_file(m, target))
        options = target.session_options()
        if m.base:  # its trained tensors are overridable initializers by design: ORT would warn about each
            options.log_severity_level = max(options.log_severity_level, 3)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(target.providers),
                                                provider_options=list(target.provider_options) or None)
        except Exception as e:  # ORT raises its own exception types for a bad graph
            raise OrtzoError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.store = store
        weights = set(store.arrays)
        self.inputs = tuple(i.name for i in self.session.get_inputs() if i.name not in weights)
        self.outputs = tuple(o.name for o in self.session.get_outputs())
        self.binding = self.session.io_binding()
        if target.device == "host":
            self.device = None
            self._weights = {}
            for name, arr in store.arrays.items():
                ov = ort.OrtValue.ortvalue_from_numpy(arr)
                self.binding.bind_ortvalue_input(name, ov)
                self._weights[name] = ov  # keep the OrtValues alive for the session's lifetime
        else:
            from .device import DeviceWeights

            self.device = device or DeviceWeights(store, target)
            self.device.bind(self.binding)

    def weight_ptr(self, name: str) -> int:
        """Where ORT reads `name` from: equal to the store array's address when zero-copy."""
        return self.device.ptr(name) if self.device else self._weights[name].data_ptr()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the graph for the data inputs in `feeds` (other keys are ignored)."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise OrtzoError(f"missing graph inputs {', '.join(missing)} (the graph takes {', '.join(self.inputs)})")
        if self.device is None:
            self.store.sync()
        else:
            self.device.fence()  # device writes on other streams land before ORT's stream reads
        for name in self.inputs:
            self.binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        for name in self.outputs:
            self.binding.bind_output(name)
        self.session.run_with_iobinding(self.binding)
        return dict(zip(self.outputs, self.binding.copy_outputs_to_cpu(), strict=True))

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output: for an exported folder, log-probabilities [N, K] of candidate ids
        `score_ids` at rows `score_index`."""
        return self.run(feeds)[self.outputs[0]]


def graph_file(manifest: Manifest, target: Target) -> str:
    """The graph file a target loads: the ONNX graph, or the ORT-format one for mobile targets."""
    if target.format == "onnx":
        return manifest.graph
    if not manifest.ort_graph:
        raise OrtzoError(f"target {target.name} loads the ORT-format graph, and this folder has none: "
                         "add it with `ortzo mobile FOLDER` (or export with --format ort)")
    return manifest.ort_graph
