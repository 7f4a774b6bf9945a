"""The on-device tokenizer: `tokenizers` over the folder's tokenizer.json, no transformers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend


class Tokenizer:
    def __init__(self, folder: str | Path, info: dict[str, Any]) -> None:
        self.backend = _Backend.from_file(str(Path(folder) / info.get("file", "tokenizer.json")))
        self.bos_id: int | None = info.get("bos_id") if info.get("add_bos") else None
        self.pad_id: int = int(info.get("pad_id") or 0)
        self.pad_right = info.get("padding_side") == "right"  # onnxruntime-genai's decoders (model/genai.py)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as the model saw it in training: the start token if it uses one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.bos_id is not None else ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids without any special token (for label words and spans)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)
