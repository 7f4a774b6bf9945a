"""The trainable model folder's manifest: what each byte of the flat weight file is.

A folder holds `model.onnx` (a weight-free graph whose weights are named inputs),
`weights.bin` (every parameter, 64-byte aligned, in manifest order), the tokenizer, the
model's Hugging Face config (`hf_config.json`, for engines that rebuild the PyTorch module)
and `manifest.json`, which this module reads, checks and writes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OrtzoError
from ..files import write_json

FORMAT = "ortzo-trainable/1"
MANIFEST = "manifest.json"
HF_CONFIG = "hf_config.json"
ALIGN = 64
DTYPES = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class Parameter:
    """One weight: its PyTorch name, its shape in the graph and where it lies in the file.

    `transposed` marks Linear weights that the exporter stores as [in, out] for MatMul.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    transposed: bool = False

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"shape": list(self.shape)}

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Parameter:
        return cls(p["name"], tuple(int(s) for s in p["shape"]), p["dtype"], int(p["offset"]),
                   bool(p.get("transposed", False)))


@dataclass(frozen=True)
class Manifest:
    graph: str
    weights: str
    weights_sha256: str
    weights_bytes: int
    parameters: tuple[Parameter, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tokenizer: dict[str, Any]  # empty: the folder has none (an `ortzo prepare`d model without one)
    tied: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    ort_graph: str | None = None  # the graph in ORT format, for mobile targets (ortzo.model.mobile)
    logits_graph: str | None = None  # the full-logits graph, same weight inputs (ortzo.model.logits)
    base: dict[str, Any] = field(default_factory=dict)  # a frozen base's constants (ortzo.model.frozen); empty: none
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["parameters"] = [p.to_json() for p in self.parameters]
        return d

    def save(self, folder: str | Path) -> None:
        write_json(Path(folder) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise OrtzoError(f"model folder not found: {folder}")
        if not path.is_file():
            raise OrtzoError(f"not a trainable model folder (no {MANIFEST}): {folder}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") != FORMAT:
                raise OrtzoError(f"{path}: unknown format {d.get('format')!r}, expected {FORMAT!r}")
            params = tuple(Parameter.from_json(p) for p in d["parameters"])
            m = cls(graph=d["graph"], weights=d["weights"], weights_sha256=d["weights_sha256"],
                    weights_bytes=int(d["weights_bytes"]), parameters=params,
                    inputs=tuple(d["inputs"]), outputs=tuple(d["outputs"]),
                    tokenizer=dict(d.get("tokenizer") or {}), tied=dict(d.get("tied", {})),
                    source=dict(d.get("source", {})), ort_graph=d.get("ort_graph"),
                    logits_graph=d.get("logits_graph"), base=dict(d.get("base") or {}))
        except OrtzoError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise OrtzoError(f"corrupt manifest {path}: {type(e).__name__}: {e}") from None
        m.check()
        for name in (m.graph, m.weights, *([m.tokenizer.get("file", "tokenizer.json")] if m.tokenizer else [])):
            if not (Path(folder) / name).is_file():
                raise OrtzoError(f"model folder {folder} is missing {name}")
        if m.base:
            _check_base(m.base, path)
            data = Path(folder) / m.base["data"]
            if not data.is_file():
                raise OrtzoError(f"model folder {folder} is missing {data.name}, its frozen base")
            if data.stat().st_size != m.base["data_bytes"]:
                raise OrtzoError(f"{data} has {data.stat().st_size} bytes, the manifest says {m.base['data_bytes']}: "
                                 "the frozen base is corrupt or not this folder's")
        if m.ort_graph and not (Path(folder) / m.ort_graph).is_file():
            raise OrtzoError(f"model folder {folder} is missing {m.ort_graph} (run `ortzo mobile {folder}`)")
        return m

    def check(self) -> None:
        """Offsets aligned, in order, not overlapping, inside the file; dtypes known."""
        end = 0
        for p in self.parameters:
            if p.dtype not in DTYPES:
                raise OrtzoError(f"corrupt manifest: parameter {p.name} has dtype {p.dtype!r}")
            if p.offset % ALIGN or p.offset < end:
                raise OrtzoError(f"corrupt manifest: parameter {p.name} at bad offset {p.offset}")
            end = p.offset + p.nbytes
        if end > self.weights_bytes:
            raise OrtzoError(f"corrupt manifest: parameters need {end} bytes, file has {self.weights_bytes}")

    def param(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)


def _check_base(base: dict[str, Any], path: Path) -> None:
    """A frozen base's record (ortzo.model.frozen): its data a file of the folder itself, its
    size, checksum and id of the right types, its quantization one ortzo writes."""
    types = {"data": str, "data_bytes": int, "data_sha256": str, "id": int, "quantize": str, "frozen": list}
    bad = [k for k, t in types.items() if not isinstance(base.get(k), t) or isinstance(base.get(k), bool)]
    if bad:
        raise OrtzoError(f"corrupt manifest {path}: its base has no valid {', '.join(bad)}")
    if Path(base["data"]).name != base["data"] or base["data"] in ("", ".", ".."):
        raise OrtzoError(f"corrupt manifest {path}: its base data {base['data']!r} is not a file of the folder")
    if base["quantize"] not in ("none", "int4", "int8"):
        raise OrtzoError(f"corrupt manifest {path}: its base is quantized as {base['quantize']!r}")
    if base["quantize"] != "none" and not (isinstance(base.get("block_size"), int)
                                           and isinstance(base.get("symmetric"), bool)):
        raise OrtzoError(f"corrupt manifest {path}: its {base['quantize']} base has no valid block_size or symmetric")


def aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def hf_config(folder: str | Path) -> dict[str, Any]:
    """The model's Hugging Face config as a dict: `transformers.AutoConfig.for_model(**d)`
    rebuilds it. A dict, so that the runtime never imports transformers."""
    path = Path(folder) / HF_CONFIG
    if not path.is_file():
        raise OrtzoError(f"model folder {folder} has no {HF_CONFIG}: export it again with this version of ortzo")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise OrtzoError(f"corrupt {path}: {e}") from None
