"""A model's tensors read one at a time from its files, under their PyTorch names: safetensors
(single or sharded, fp32/fp16/bf16) and GGUF (each tensor dequantized to fp32 on its own).

Both read with pread(2), never through a memory map: mapped pages a reader touches count in
the process's RSS until the file closes, and one shard of a 7B model is ~10 GB. So exporting
holds one tensor (plus its fp32 copy) at a time, whatever the model's size."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...errors import OrtzoError
from .names import meta_model

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Tensors(Protocol):
    """Source tensors by PyTorch name."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a new array, in its stored dtype where NumPy has it (bf16 as fp32)."""
        ...


class SafetensorsFiles:
    """The safetensors files of a Hugging Face folder: `model.safetensors`, or the shards its
    `model.safetensors.index.json` names."""

    def __init__(self, folder: Path):
        index = folder / INDEX
        if index.is_file():
            self._where = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / SINGLE).is_file():
            self._where = {k: folder / SINGLE for k in _keys(folder / SINGLE)}
        else:
            raise OrtzoError(f"{folder} holds no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
        for path in set(self._where.values()):
            if not path.is_file():
                raise OrtzoError(f"{index} names {path.name}, which is missing")

    def names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str) -> np.ndarray:
        import ml_dtypes  # noqa: F401  (registers NumPy's "bfloat16", which safetensors returns)
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="numpy", backend="pread") as f:
            arr = f.get_tensor(name)
        return arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr  # pread: its own buffer


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy", backend="pread") as f:
        return list(f.keys())


class GGUFTensors:
    """The tensors of a GGUF file, each dequantized to fp32 and renamed and fixed up as
    transformers does when it loads the whole file (`load_gguf_checkpoint`): its name map and
    per-architecture processors (Llama's q/k permutation, Gemma's `norm - 1`), one at a time."""

    def __init__(self, path: Path, config: Any):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        self._path = path
        reader = GGUFReader(str(path))  # maps the file; only the tensors' places are kept
        arch = read_field(reader, "general.architecture")[0]
        # the processors read the config under its Hugging Face names (heads, kv heads)
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        self._map = get_gguf_hf_weights_map(meta_model(config))
        # PyTorch name -> (GGUF name, quantization type, raw shape, raw dtype, offset, bytes)
        self._where = {self._map[t.name]: (t.name, t.tensor_type, tuple(t.data.shape), t.data.dtype,
                                           int(t.data_offset), int(t.n_bytes))
                       for t in reader.tensors if t.name in self._map}
        del reader

    def names(self) -> list[str]:
        return list(self._where)

    def stored_bits(self) -> dict[str, int]:
        """The bits of each tensor's codes, from its type's name (Q4_1 and IQ4_XS 4, Q5_0 5,
        Q6_K 6, Q8_0 8, F16 and BF16 16): the block scales' bytes are not counted."""
        return {name: int(re.search(r"\d+", kind.name).group()) for name, (_, kind, *_) in self._where.items()}

    def read(self, name: str) -> np.ndarray:
        from gguf import dequantize

        gname, kind, shape, dtype, offset, n_bytes = self._where[name]
        fd = os.open(self._path, os.O_RDONLY)
        try:
            raw = np.frombuffer(os.pread(fd, n_bytes, offset), dtype=dtype).reshape(shape)
        finally:
            os.close(fd)
        done = self._processor.process(weights=dequantize(raw, kind), name=gname, tensor_key_mapping=self._map,
                                       parsed_parameters={"tensors": {}})
        if done.name != gname:  # GPT-2's and Qwen2-MoE's processors move tensors elsewhere
            raise OrtzoError(f"{self._path.name}: {gname} is renamed on loading, which the streamed export "
                             "does not follow; export the model from its safetensors instead")
        return np.ascontiguousarray(done.weights, dtype=np.float32)
