from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tiny import make_tiny_llama

def open_folder(folder: Path, weights: Path | None = None, sha: str | None = None):
    """(store, session) over a trainable folder, on the CPU target."""
    from ortzo.model.manifest import Manifest
    from ortzo.model.session import ScoringSession
    from ortzo.model.targets import load_target
    from ortzo.model.weights import WeightStore

    store = WeightStore.load(folder, Manifest.load(folder), weights, sha)
    return store, ScoringSession(folder, store, load_target("cpu"))


# The project's data folder: $ORTZO_DATA, else ../shared/data beside the checkout.
SHARED_DATA = Path(os.environ.get("ORTZO_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tiny_model(tiny_hf, tmp_path_factory) -> Path:
    """The tiny Llama as a trainable folder (tied embeddings). Tests must not modify it."""
    from ortzo.model.export import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny"
    export_model(str(tiny_hf), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_fp16(tiny_hf, tmp_path_factory) -> Path:
    from ortzo.model.export import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny16"
    export_model(str(tiny_hf), out, dtype="float16")
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """An SST-2-shaped task the tiny model can learn: the label is the sentence's first word."""
    folder = tmp_path_factory.mktemp("data") / "sst2"
    folder.mkdir()
    words = {1: ["great", "good", "wonderful", "brilliant"], 0: ["terrible", "bad", "awful", "dull"]}
    for split, n in (("train", 64), ("validation", 32)):
        rows = [{"sentence": f"{words[i % 2][(i // 2) % 4]} movie and the plot ", "label": i % 2, "idx": i}
                for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
