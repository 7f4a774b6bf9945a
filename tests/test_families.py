"""Every causal-LM family Optimum exports becomes a trainable folder that computes what the
PyTorch model computes, under PyTorch's names, tied weights one buffer, its config kept."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ortzo.errors import OrtzoError
from ortzo.model.manifest import HF_CONFIG, Manifest, hf_config
from ortzo.tasks.batches import collate

from conftest import open_folder
from tiny import FAMILIES

# family -> (input embedding, the head's own weight; None where tied to the embedding)
HEADS = {
    "llama": ("model.embed_tokens.weight", None),
    "gemma3": ("model.embed_tokens.weight", None),
    "gpt2": ("transformer.wte.weight", None),
    "opt": ("model.decoder.embed_tokens.weight", None),
    "qwen2": ("model.embed_tokens.weight", None),
    "qwen3": ("model.embed_tokens.weight", "lm_head.weight"),
    "phi3": ("model.embed_tokens.weight", "lm_head.weight"),
    "mistral": ("model.embed_tokens.weight", "lm_head.weight"),
    "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight"),
    "phi": ("model.embed_tokens.weight", "lm_head.weight"),
    "gemma2": ("model.embed_tokens.weight", None),
    "cohere": ("model.embed_tokens.weight", None),
}
CANDIDATES = np.array([7, 40, 99])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    """(family, Hugging Face folder, trainable folder, the PyTorch model); the tiny Llama is the
    session's own export (tied)."""
    from ortzo.model.export import export_model

    family = request.param
    if family == "llama":
        hf, out = request.getfixturevalue("tiny_hf"), request.getfixturevalue("tiny_model")
    else:
        root = tmp_path_factory.mktemp(family)
        hf = FAMILIES[family](root / "hf")
        out = root / "out"
        export_model(str(hf), out, say=lambda _: None)
    return family, hf, out, AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()


def _ragged_feeds() -> dict[str, np.ndarray]:
    """A left-padded batch longer than the sliding windows (4), every real position scored."""
    rng = np.random.default_rng(0)
    feeds = collate([list(rng.integers(2, 300, size=n)) for n in (5, 11, 2, 8)], 1, CANDIDATES)
    feeds["score_index"] = np.flatnonzero(feeds["attention_mask"])
    feeds["score_ids"] = np.tile(CANDIDATES, (len(feeds["score_index"]), 1))
    return feeds


def _torch_scores(model, feeds: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    with torch.no_grad():
        logits = model(**{k: torch.tensor(feeds[k]) for k in names}).logits
    return torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])[feeds["score_index"]][:, CANDIDATES].numpy()


def test_scores_equal_pytorch_log_probs_under_left_padding(exported):
    family, _, out, model = exported
    assert "position_ids" in Manifest.load(out).inputs  # Optimum's Gemma 3 config lacks it
    _, session = open_folder(out)
    feeds = _ragged_feeds()
    got = session(feeds)
    np.testing.assert_allclose(got, _torch_scores(model, feeds, ("input_ids", "attention_mask", "position_ids")),
                               rtol=0, atol=2e-5)
    if family == "opt":  # OPT numbers positions from the mask itself: the graph's positions must agree
        np.testing.assert_allclose(got, _torch_scores(model, feeds, ("input_ids", "attention_mask")), rtol=0, atol=2e-5)


def test_parameters_carry_pytorch_names_and_values(exported):
    _, _, out, model = exported
    store, _ = open_folder(out)
    m = store.manifest
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    names = [p.name for p in m.parameters]
    assert len(names) == len(set(names))
    assert set(names) == set(state) - set(m.tied)
    for p in m.parameters:
        np.testing.assert_array_equal(store.arrays[p.name], state[p.name].T if p.transposed else state[p.name])
        if p.transposed:  # only Linear weights, which the graph multiplies as [in, out]
            assert isinstance(model.get_submodule(p.name.rsplit(".", 1)[0]), torch.nn.Linear), p.name


def test_tied_weights_are_one_buffer(exported):
    family, _, out, _ = exported
    m = Manifest.load(out)
    embedding, head = HEADS[family]
    assert m.param(embedding).transposed is False
    if head is None:
        assert m.tied == {"lm_head.weight": embedding}
        assert "lm_head.weight" not in [p.name for p in m.parameters]
    else:
        assert m.tied == {}
        assert m.param(head).transposed


def test_hf_config_round_trips(exported):
    family, hf, out, model = exported
    d = hf_config(out)
    assert (out / HF_CONFIG).is_file() and d["tie_word_embeddings"] is (HEADS[family][1] is None)
    rebuilt = AutoConfig.for_model(**d)
    assert type(rebuilt) is type(model.config)
    want = AutoConfig.from_pretrained(hf).to_dict()
    assert rebuilt.to_dict() == want | {"_name_or_path": ""}


def test_a_folder_without_hf_config_says_so(tmp_path):
    with pytest.raises(OrtzoError, match=HF_CONFIG):
        hf_config(tmp_path)


def test_the_pytorch_engines_module_computes_the_same_scores(exported):
    """The torch engines' module, rebuilt from hf_config.json over the folder's weights (in
    PyTorch's layout, in place), scores as the ORT graph does."""
    from ortzo.engines.torch_model import load_module, scores
    from ortzo.model.weights import WeightStore

    family, _, out, _ = exported
    _, session = open_folder(out)
    feeds = _ragged_feeds()
    store = WeightStore.load(out, Manifest.load(out))
    with torch.inference_mode():
        got = scores(load_module(out, store), feeds).numpy()
    np.testing.assert_allclose(got, session(feeds), rtol=0, atol=3e-5, err_msg=family)


def test_the_pytorch_baselines_score_what_the_graph_scores(exported):
    """The PyTorch engines' head (torch_model.scores: the lm head on the scored rows, then what
    the family's forward does to logits: a bias, a soft-cap, a logit scale) equals the graph's."""
    from ortzo.engines.torch_model import scores

    family, _, out, model = exported
    _, session = open_folder(out)
    feeds = _ragged_feeds()
    with torch.no_grad():
        got = scores(model, feeds).numpy()
    np.testing.assert_allclose(got, session(feeds), rtol=0, atol=2e-5, err_msg=family)
