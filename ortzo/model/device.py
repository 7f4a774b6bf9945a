"""Weights resident on a CUDA device, bound once, changed in place there.

The store's flat buffer is copied once into one device allocation that ORT owns (an OrtValue
of bytes); each parameter is bound by pointer at its offset, so the graph reads the device
copy directly and a step copies no weights between host and device. Binding NumPy memory
instead would copy it to the device at bind time and silently ignore later edits (ORT issues
#5857, #15438, #29782).

Training reads and writes the same bytes through CuPy views (no copy): CuPy runs on its own
stream and ORT computes on another, so `fence` (a device synchronize) orders every write
before the next run; ORT synchronizes its stream at the end of each run, so writes after a
run never race its reads. `download` copies the live weights back into the store (before a
save); `upload` pushes the store's buffer up again (after a restore).

Needs the `cuda` extra (onnxruntime-gpu, cupy-cuda13x).
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from ..errors import OrtzoError
from .targets import Target
from .weights import WeightStore

DTYPES = {"float32": np.float32, "float16": np.float16}


class DeviceWeights:
    def __init__(self, store: WeightStore, target: Target) -> None:
        import onnxruntime as ort

        options = target.provider_options[0] if target.provider_options else {}
        self.device_id = int(options.get("device_id", 0))
        if any(p.dtype != "float32" for p in store.manifest.parameters):
            raise OrtzoError(f"target {target.name}: fp16 folders train through fp32 masters on the host; "
                             "export the model in float32 for a device target")
        self.store = store
        self.flat = ort.OrtValue.ortvalue_from_shape_and_type((store.buffer.size,), np.uint8, "cuda", self.device_id)
        self.base = self.flat.data_ptr()
        self.upload()
        store.resident = self

    @cached_property
    def bytes(self):  # -> cupy.ndarray of uint8 over ORT's allocation, no copy
        import cupy as cp

        memory = cp.cuda.UnownedMemory(self.base, self.store.buffer.size, self.flat, self.device_id)
        return cp.ndarray((self.store.buffer.size,), cp.uint8, cp.cuda.MemoryPointer(memory, 0))

    def ptr(self, name: str) -> int:
        return self.base + self.store.manifest.param(name).offset

    def bind(self, binding) -> None:
        """Bind every weight input of `binding` to its place in the device allocation."""
        for p in self.store.manifest.parameters:
            binding.bind_input(p.name, "cuda", self.device_id, DTYPES[p.dtype], list(p.shape), self.base + p.offset)

    def trainable(self, names: list[str]) -> list:
        """CuPy float32 views of the parameters `names` (the optimizer's buffers)."""
        out = []
        for n in names:
            p = self.store.manifest.param(n)
            out.append(self.bytes[p.offset:p.offset + p.nbytes].view(np.float32).reshape(p.shape))
        return out

    def fence(self) -> None:
        import cupy as cp

        cp.cuda.runtime.deviceSynchronize()

    def upload(self) -> None:
        self.flat.update_inplace(self.store.buffer)

    def download(self) -> None:
        self.fence()
        self.bytes.get(out=self.store.buffer)
