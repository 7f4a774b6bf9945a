"""An ONNX Runtime inference session over the weight store, bound once with IOBinding.

The weight inputs are OrtValues over the store's NumPy memory (zero-copy), bound once; each
call binds only the batch and reads the scores. Nothing here knows about tasks or training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import OrtzoError
from .targets import Target
from .weights import WeightStore


class ScoringSession:
    def __init__(self, folder: str | Path, store: WeightStore, target: Target) -> None:
        target.check_available()
        m = store.manifest
        try:
            self.session = ort.InferenceSession(str(Path(folder) / m.graph), target.session_options(),
                                                providers=list(target.providers),
                                                provider_options=list(target.provider_options) or None)
        except Exception as e:  # ORT raises its own exception types for a bad graph
            raise OrtzoError(f"onnxruntime cannot load {Path(folder) / m.graph}: {str(e).splitlines()[0]}") from None
        self.store = store
        self.inputs, self.output = m.inputs, m.outputs[0]
        self.binding = self.session.io_binding()
        self._weights = {}
        for name, arr in store.arrays.items():
            ov = ort.OrtValue.ortvalue_from_numpy(arr)
            self.binding.bind_ortvalue_input(name, ov)
            self._weights[name] = ov  # keep the OrtValues alive for the session's lifetime

    def weight_ptr(self, name: str) -> int:
        """Where ORT reads `name` from: equal to the store array's address when zero-copy."""
        return self._weights[name].data_ptr()

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Log-probabilities [N, K] of candidate ids `score_ids` at rows `score_index`."""
        self.store.sync()
        for name in self.inputs:
            self.binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        self.binding.bind_output(self.output)
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[0]
