"""`ortzo bake` and the full-logits graph: the baked model computes the trainable graph's
scores as full logits, with a run's fine-tuned weights, loads in plain onnxruntime and in
Optimum with its KV cache, generates as transformers does, a prepared folder bakes into its
original graph with the trained weights, and a bad input is one line that leaves everything as
it was."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

import ortzo
from ortzo.cli import main
from ortzo.model.bake import DATA, MODEL
from ortzo.recipes.bake import bake, weights_at
from ortzo.model.logits import LOGITS
from ortzo.model.manifest import HF_CONFIG, MANIFEST, Manifest
from ortzo.model.tokenizer import Tokenizer
from ortzo.model.weights import WeightStore
from ortzo.run import checkpoint
from ortzo.tasks.batches import collate

from conftest import open_folder
from test_prepare import feeds as bert_feeds, make_tiny_bert, reference
from tiny import VOCAB, make_tiny_llama

TRAIN = ["--task", "sst2", "--batch-size", "8", "--lr", "5e-3", "--eval-every", "6", "--checkpoint-every", "4",
         "--train-examples", "48", "--eval-examples", "8", "--params", "all"]  # matrices change too
PROMPT = "the film was great and the plot"
DATA_INPUTS = ("input_ids", "attention_mask", "position_ids")
ENGINES = ("ort", "torch-mezo")


@pytest.fixture(scope="module")
def untied_fp16(tmp_path_factory) -> Path:
    """An untied head (MatMul with the [hidden, vocab] lm_head) read through an fp16 cast."""
    from ortzo.model.export import export_model

    root = tmp_path_factory.mktemp("untied")
    out = root / "out"
    export_model(str(make_tiny_llama(root / "hf", seed=1, tie=False)), out, dtype="float16", say=lambda _: None)
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """Optimum's text-classification export of a tiny BERT: someone else's ONNX model."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """A 6-step run of each MeZO engine (torch-mezo keeps its store in PyTorch's layout),
    checkpoints at steps 4 and 6."""
    root = tmp_path_factory.mktemp("runs")
    for engine in ENGINES:
        assert main(["finetune", str(tiny_model), "--data", str(tiny_data), "--out", str(root / engine),
                     "--steps", "6", "--engine", engine, *TRAIN]) == 0
    return {engine: root / engine for engine in ENGINES}


def _feeds() -> dict[str, np.ndarray]:
    """A ragged left-padded batch with every real position scored against random candidates."""
    rng = np.random.default_rng(0)
    feeds = collate([list(rng.integers(2, 300, size=n)) for n in (5, 9, 2)], 1, np.array([0]))
    feeds["score_index"] = np.flatnonzero(feeds["attention_mask"])
    feeds["score_ids"] = rng.integers(0, VOCAB, size=(len(feeds["score_index"]), 3))
    return feeds


def _baked_logits(out: Path, feeds: dict[str, np.ndarray], cache: bool = True) -> np.ndarray:
    """The baked model's logits over the whole batch, from an empty KV cache where it has one."""
    session = ort.InferenceSession(str(out / MODEL), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((len(feeds["input_ids"]), i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    assert bool(past) == cache and {i.name for i in session.get_inputs()} == {*DATA_INPUTS, *past}
    if cache:  # two layers, a key and a value each; a present for each past
        assert len(past) == 4 and {o.name for o in session.get_outputs()} == {
            "logits", *(n.replace("past_key_values.", "present.") for n in past)}
    return session.run(["logits"], {k: feeds[k] for k in DATA_INPUTS} | past)[0]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _baked_weights(out: Path) -> dict[str, np.ndarray]:
    """Every initializer of the baked model (the weights, and the graph's own constants)."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / MODEL)).graph.initializer}


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("model", ["tiny_model", "tiny_model_fp16", "untied_fp16"])
def test_baked_logits_are_the_scoring_heads_log_probs(model, request, tmp_path):
    folder = request.getfixturevalue(model)
    bake(folder, tmp_path / "baked", say=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "baked").iterdir()) == [
        "config.json", "genai_config.json", "generation_config.json", MODEL, DATA, "tokenizer.json",
        "tokenizer_config.json"]
    feeds = _feeds()
    logits = _baked_logits(tmp_path / "baked", feeds)
    b, s = feeds["input_ids"].shape
    assert logits.shape == (b, s, VOCAB) and logits.dtype == np.float32
    store, session = open_folder(folder)
    rows = _log_softmax(logits).reshape(b * s, -1)[feeds["score_index"]]
    want = np.take_along_axis(rows, feeds["score_ids"], 1)
    np.testing.assert_allclose(session(feeds), want, rtol=0, atol=1e-5)
    weights = _baked_weights(tmp_path / "baked")  # the folder's own weights, in its layout and dtype
    assert store.arrays.keys() <= weights.keys()
    for name, a in store.arrays.items():
        assert weights[name].dtype == a.dtype and np.array_equal(weights[name], a), name


def test_baked_logits_equal_pytorch(tiny_hf, tiny_model, tmp_path):
    bake(tiny_model, tmp_path / "baked", say=lambda _: None)
    feeds = _feeds()
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(**{k: torch.tensor(feeds[k]) for k in ("input_ids", "attention_mask", "position_ids")}).logits
    got = _baked_logits(tmp_path / "baked", feeds)
    real = feeds["attention_mask"].astype(bool)  # padded positions are not the model's
    np.testing.assert_allclose(got[real], want.numpy()[real], rtol=0, atol=2e-5)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_model_fp16", "untied_fp16"])
def test_logits_graph_bound_to_the_store_is_the_baked_model(model, request, tmp_path):
    """logits.onnx takes model.onnx's weight inputs, bound zero-copy to the store's arrays."""
    folder = request.getfixturevalue(model)
    m = Manifest.load(folder)
    assert m.logits_graph == LOGITS
    graph, trainable = (onnx.load(str(folder / f)).graph for f in (LOGITS, m.graph))
    weights = {i.name: i.type for i in trainable.input if i.name in {p.name for p in m.parameters}}
    assert {i.name: i.type for i in graph.input if i.name in weights} == weights
    assert not {t.name for t in graph.initializer} & weights.keys()  # weight-free
    store = WeightStore.load(folder, m)
    session = ort.InferenceSession(str(folder / LOGITS), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in store.arrays.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
        assert value.data_ptr() == store.arrays[name].ctypes.data
    feeds = _feeds()
    for name in ("input_ids", "attention_mask", "position_ids"):
        binding.bind_cpu_input(name, feeds[name])
    binding.bind_output("logits")
    session.run_with_iobinding(binding)
    bake(folder, tmp_path / "baked", say=lambda _: None)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], _baked_logits(tmp_path / "baked", feeds),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_bakes_its_fine_tuned_weights(engine, runs, tiny_model, tmp_path):
    run = runs[engine]
    before = _snapshot(run)
    bake(run, tmp_path / "final", say=lambda _: None)
    bake(run, tmp_path / "step5", step=5, say=lambda _: None)  # checkpoint 4, then one step replayed
    assert _snapshot(run) == before  # read only
    m = Manifest.load(tiny_model)
    meta = json.loads((run / checkpoint.DIR / checkpoint.name(6) / checkpoint.META).read_text())
    final = WeightStore.load(tiny_model, m, run / checkpoint.DIR / checkpoint.name(6) / checkpoint.WEIGHTS,
                             meta["sha256"]).arrays
    original = WeightStore.load(tiny_model, m).arrays
    baked = _baked_weights(tmp_path / "final")
    assert all(np.array_equal(baked[n], a) for n, a in final.items())
    assert not np.array_equal(baked["model.layers.0.self_attn.q_proj.weight"],
                              original["model.layers.0.self_attn.q_proj.weight"])
    feeds = _feeds()
    _, session = open_folder(tiny_model, run / checkpoint.DIR / checkpoint.name(6) / checkpoint.WEIGHTS,
                             meta["sha256"])
    rows = _log_softmax(_baked_logits(tmp_path / "final", feeds)).reshape(-1, VOCAB)[feeds["score_index"]]
    np.testing.assert_allclose(session(feeds), np.take_along_axis(rows, feeds["score_ids"], 1), rtol=0, atol=1e-5)
    step5 = _baked_weights(tmp_path / "step5")
    changed = [n for n in final if not np.array_equal(step5[n], final[n])]
    assert changed and any(not np.array_equal(step5[n], original[n]) for n in changed)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_model_fp16"])
def test_a_replayed_step_equals_a_run_that_stopped_there(model, request, tiny_data, tmp_path):
    """bake --step 5 replays step 5 after checkpoint 4 (an fp16 folder's on its fp32 masters):
    the weights of a 5-step run, exactly."""
    folder = request.getfixturevalue(model)
    for steps in (6, 5):
        assert main(["finetune", str(folder), "--data", str(tiny_data), "--out", str(tmp_path / str(steps)),
                     "--steps", str(steps), "--schedule-steps", "6", *TRAIN]) == 0
    bake(tmp_path / "6", tmp_path / "step5", step=5, say=lambda _: None)
    bake(tmp_path / "5", tmp_path / "short5", say=lambda _: None)
    a, b = _baked_weights(tmp_path / "step5"), _baked_weights(tmp_path / "short5")
    assert all(np.array_equal(a[n], b[n]) for n in a)


def _torch_model(hf: Path, store: WeightStore):
    """transformers' model of `hf`'s config with the store's weights (in PyTorch's layout: a
    PyTorch engine's store is in it already)."""
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    layout = {p.name: p.transposed and p.name not in store.flipped for p in store.manifest.parameters}
    state = {n: torch.tensor(np.ascontiguousarray(a.T if layout[n] else a), dtype=torch.float32)
             for n, a in store.arrays.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(store.manifest.tied), missing  # tied: one tensor
    return model


@pytest.mark.parametrize("engine", ENGINES)
def test_optimum_loads_the_baked_causal_lm_with_its_kv_cache_and_generates_as_transformers(engine, runs, tiny_hf,
                                                                                          tmp_path):
    """Optimum's from_pretrained with its defaults (use_cache=True) loads the baked run, which
    has a KV cache, and generates greedily what transformers generates with the run's weights."""
    from optimum.onnxruntime import ORTModelForCausalLM

    out = tmp_path / "baked"
    bake(runs[engine], out, say=lambda _: None)
    graph = onnx.load(str(out / MODEL), load_external_data=False).graph
    assert [i.name for i in graph.input if i.name.startswith("past_key_values.")] == [
        f"past_key_values.{layer}.{kv}" for layer in range(2) for kv in ("key", "value")]
    model = ORTModelForCausalLM.from_pretrained(out)
    assert model.can_use_cache and model.config.use_cache
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["the film was great and the plot", "it was boring"], return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and (ids["attention_mask"][:, 0] == 0).any()  # a ragged batch
    generated = model.generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    _, store, _ = weights_at(runs[engine])
    with torch.no_grad():
        want = _torch_model(tiny_hf, store).generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert generated.tolist() == want.tolist()


def test_onnxruntime_genai_generates_with_the_baked_causal_lm_as_transformers_does(runs, tiny_hf, tmp_path):
    """og.Model loads the baked run as it is (genai_config.json, the same graph, its cache grown
    by og): at every token its logits are transformers' for the whole sequence so far with the
    run's weights, and its greedy tokens are transformers' greedy tokens."""
    import onnxruntime_genai as og

    out = tmp_path / "baked"
    bake(runs["ort"], out, say=lambda _: None)
    model = og.Model(str(out))
    prompt = [int(t) for t in og.Tokenizer(model).encode(PROMPT)]
    assert prompt == AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 10, min_length=len(prompt) + 10)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    logits = []
    while not generator.is_done():
        logits.append(np.asarray(generator.get_logits())[0, -1])
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)]
    _, store, _ = weights_at(runs["ort"])
    torch_model = _torch_model(tiny_hf, store)
    with torch.no_grad():
        want = torch_model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        full = torch_model(want).logits[0].numpy()
    assert tokens == want[0].tolist()
    np.testing.assert_allclose(np.array(logits), full[len(prompt) - 1:-1], rtol=0, atol=1e-4)


def test_a_gguf_converted_tokenizer_encodes_in_onnxruntime_genai_as_in_ortzo(tiny_model, tmp_path):
    """transformers' GGUF conversion gives a byte-level BPE SentencePiece's decoder steps, which
    made onnxruntime-genai encode each space as three unknown tokens (SmolLM2's packaged GGUF
    generated garbage). Baked, og encodes and decodes as ortzo's tokenizer does, and every
    token decodes as the folder's own tokenizer decodes it."""
    import onnxruntime_genai as og
    from tokenizers import Tokenizer as HFTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Sequence", "decoders": [  # as transformers writes it for SmolLM2's GGUF
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    bake(folder, tmp_path / "baked", say=lambda _: None)
    tokenizer = og.Tokenizer(og.Model(str(tmp_path / "baked")))
    ids = [int(t) for t in tokenizer.encode(PROMPT)]
    assert ids == Tokenizer(folder, Manifest.load(folder).tokenizer).encode(PROMPT)
    assert tokenizer.decode(np.array(ids, np.int32)) == PROMPT
    source, baked = (HFTokenizer.from_file(str(f / "tokenizer.json")) for f in (folder, tmp_path / "baked"))
    everything = list(range(source.get_vocab_size()))
    assert [baked.decode([i]) for i in everything] == [source.decode([i]) for i in everything]
    assert baked.decode(everything) == source.decode(everything)


def test_the_kv_cache_computes_what_the_whole_sequence_does(tiny_model, tmp_path):
    """Optimum's cached generation is an argmax loop over the baked model rerun on the whole
    sequence from an empty cache."""
    from optimum.onnxruntime import ORTModelForCausalLM

    out = tmp_path / "baked"
    bake(tiny_model, out, say=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == Tokenizer(tiny_model, Manifest.load(tiny_model).tokenizer).encode(PROMPT)
    generated = ORTModelForCausalLM.from_pretrained(out).generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist()
    tokens, eos = ids["input_ids"][0].tolist(), json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    for _ in range(8):
        x = np.array([tokens])
        logits = _baked_logits(out, {"input_ids": x, "attention_mask": np.ones_like(x),
                                     "position_ids": np.arange(x.shape[1])[None]})
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == eos:
            break
    assert generated == tokens


def test_without_the_export_extra_the_baked_model_has_no_cache_and_says_so(tiny_model, tmp_path, monkeypatch):
    """The KV-cache graph is traced with Optimum; without it the full-logits graph is baked, which
    Optimum loads with use_cache=False, and one line says so."""
    from optimum.onnxruntime import ORTModelForCausalLM

    import ortzo.model.bake

    from ortzo.extras import MissingExtra

    def no_torch(extra, what="this"):
        raise MissingExtra(extra, "torch", what)
    monkeypatch.setattr(ortzo.model.bake, "require", no_torch)
    said: list[str] = []
    bake(tiny_model, tmp_path / "baked", say=said.append)
    assert len(said) == 1 and "torch is missing" in said[0] and "use_cache=False" in said[0] and "\n" not in said[0]
    assert not (tmp_path / "baked" / "genai_config.json").exists()  # og needs the cache
    feeds = _feeds()
    store, session = open_folder(tiny_model)
    b, s = feeds["input_ids"].shape
    rows = _log_softmax(_baked_logits(tmp_path / "baked", feeds, cache=False)).reshape(b * s, -1)[feeds["score_index"]]
    np.testing.assert_allclose(session(feeds), np.take_along_axis(rows, feeds["score_ids"], 1), rtol=0, atol=1e-5)
    ids = AutoTokenizer.from_pretrained(tmp_path / "baked")(PROMPT, return_tensors="pt")
    with pytest.raises(ValueError, match="does not support pkv cache"):  # Optimum's own message
        ORTModelForCausalLM.from_pretrained(tmp_path / "baked").generate(**ids, max_new_tokens=4)
    model = ORTModelForCausalLM.from_pretrained(tmp_path / "baked", use_cache=False)
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4


def _trained(folder: Path, out: Path, params: str = "all") -> tuple[Path, str]:
    """A few MeZO steps over the prepared folder through the API (cross-entropy of its logits on
    made-up labels), saved as a weight file: (the file, its sha256)."""
    labels = np.array([1, 0, 0, 1])

    def loss(outputs: dict[str, np.ndarray]) -> float:
        logp = _log_softmax(outputs["logits"].astype(np.float64))
        return float(-logp[np.arange(len(labels)), labels].mean())

    model = ortzo.open(folder).train(lr=0.5, eps=1e-2, params=params)
    for _ in range(3):
        model.step(bert_feeds(folder / "model.onnx"), loss)
    return out, model.save(out)


def _substituted(original: Path, values: dict[str, np.ndarray], out: Path) -> Path:
    """The original ONNX model with the initializers `values` names holding those values."""
    model = onnx.load(str(original))
    found = set()
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[init.name]), init.name))
            found.add(init.name)
    assert found == values.keys()
    onnx.save(model, str(out))
    return out


def test_a_prepared_model_bakes_into_its_own_graph_with_the_trained_weights(tiny_bert, tmp_path):
    """The baked model is the original ONNX model with each trained initializer's value replaced
    by the run's (the test substitutes them itself), run by plain onnxruntime."""
    folder = ortzo.prepare(tiny_bert, tmp_path / "m")
    weights, sha = _trained(folder, tmp_path / "trained.bin")
    before = _snapshot(folder)
    bake(folder, tmp_path / "baked", weights=weights, sha256=sha, say=lambda _: None)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in (tmp_path / "baked").iterdir()) == [MODEL, DATA, "tokenizer.json"]
    assert (tmp_path / "baked" / "tokenizer.json").read_bytes() == (tiny_bert.parent / "tokenizer.json").read_bytes()
    trained = dict(ortzo.open(folder, weights=weights, sha256=sha).store.arrays)
    untrained = ortzo.open(folder).store.arrays
    assert sum(not np.array_equal(trained[n], untrained[n]) for n in trained) > 10  # the run changed them
    batch = bert_feeds(tiny_bert)
    got = reference(tmp_path / "baked" / MODEL, batch)["logits"]
    want = reference(_substituted(tiny_bert, trained, tmp_path / "substituted.onnx"), batch)["logits"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want - reference(tiny_bert, batch)["logits"]).max() > 1e-3  # the trained weights matter
    np.testing.assert_allclose(got, ortzo.open(folder, weights=weights).run(batch)["logits"], rtol=0, atol=1e-5)
    inits = {t.name: t for t in onnx.load(str(tmp_path / "baked" / MODEL), load_external_data=False).graph.initializer}
    original = onnx.load(str(tiny_bert), load_external_data=False).graph
    assert inits.keys() == {t.name for t in original.initializer}  # names, dtypes and shapes as the original's
    assert all(inits[t.name].data_type == t.data_type and inits[t.name].dims == t.dims for t in original.initializer)
    baked = onnx.load(str(tmp_path / "baked" / MODEL), load_external_data=False).graph
    assert [i.name for i in baked.input] == [i.name for i in original.input]  # the data inputs, as before
    assert [o.name for o in baked.output] == [o.name for o in original.output]
    assert main(["bake", str(folder), "--out", str(tmp_path / "as-prepared")]) == 0  # the folder's own weights
    np.testing.assert_allclose(reference(tmp_path / "as-prepared" / MODEL, batch)["logits"],
                               reference(tiny_bert, batch)["logits"], rtol=0, atol=1e-5)
    assert main(["bake", str(folder), "--weights", str(weights), "--sha256", sha,  # the API's saved file, by CLI
                 "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / DATA).read_bytes() == (tmp_path / "baked" / DATA).read_bytes()
    assert main(["bake", str(folder), "--weights", str(weights), "--sha256", "0" * 64,
                 "--out", str(tmp_path / "bad-sha")]) == 2 and not (tmp_path / "bad-sha").exists()


def test_a_prepared_frozen_int4_base_bakes_with_its_trained_vectors(tiny_bert, tmp_path):
    """`prepare --quantize int4 --lora`, its vectors trained: the baked model keeps the base as
    the folder holds it; plain onnxruntime on the original file with each quantized matrix
    dequantized and each vector the run's (the test's own arithmetic and substitution) computes
    what it computes (LoRA B starts at zero and did not train)."""
    from test_frozen import _dequantized

    folder = tmp_path / "q"
    assert main(["prepare", str(tiny_bert), "--out", str(folder), "--quantize", "int4", "--block-size", "16",
                 "--accuracy-level", "0", "--lora", "r=2,targets=onnx::MatMul_*"]) == 0
    weights, sha = _trained(folder, tmp_path / "trained.bin", params="vectors")
    bake(folder, tmp_path / "baked", weights=weights, sha256=sha, say=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "baked").iterdir()) == [MODEL, DATA, "tokenizer.json"]
    m = Manifest.load(folder)
    store = ortzo.open(folder, weights=weights, sha256=sha).store
    values = {n: a for n, a in store.arrays.items() if a.ndim == 1}
    assert any(not np.array_equal(a, ortzo.open(folder).store.arrays[n]) for n, a in values.items())
    for f in m.base["frozen"]:
        if f["stored"].startswith("int"):
            deq = _dequantized(folder, f["name"], int(f["stored"][3:]), 16, *f["k_n"]).astype(np.float32)
            values[f["name"]] = deq.T if f["stored_out_in"] else deq
    batch = bert_feeds(tiny_bert)
    want = reference(_substituted(tiny_bert, values, tmp_path / "substituted.onnx"), batch)["logits"]
    np.testing.assert_allclose(reference(tmp_path / "baked" / MODEL, batch)["logits"], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reference(tmp_path / "baked" / MODEL, batch)["logits"],
                               ortzo.open(folder, weights=weights).run(batch)["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("add_bos", [False, True])
def test_the_baked_tokenizer_encodes_as_ortzo_does(add_bos, tiny_model, tmp_path):
    """A tokenizer read from GGUF may add a start token the model never saw (SmolLM2's does);
    the baked one adds it exactly when the manifest says so."""
    from tokenizers import Tokenizer as Backend, processors

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    d = json.loads((folder / MANIFEST).read_text())
    d["tokenizer"]["add_bos"] = add_bos
    (folder / MANIFEST).write_text(json.dumps(d))
    if not add_bos:  # the folder's tokenizer adds <s> by itself
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        backend.save(str(folder / "tokenizer.json"))
    bake(folder, tmp_path / "baked", say=lambda _: None)
    got = AutoTokenizer.from_pretrained(tmp_path / "baked")(PROMPT)["input_ids"]
    want = Tokenizer(folder, d["tokenizer"]).encode(PROMPT)
    assert got == want and (want[0] == 0) == add_bos


def test_an_old_folder_without_a_logits_graph_bakes_and_is_left_alone(tiny_model, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(tiny_model, folder)
    (folder / LOGITS).unlink()
    d = json.loads((folder / MANIFEST).read_text())
    del d["logits_graph"]
    (folder / MANIFEST).write_text(json.dumps(d))
    assert Manifest.load(folder).logits_graph is None
    before = _snapshot(folder)
    assert main(["bake", str(folder), "--out", str(tmp_path / "baked")]) == 0
    assert _snapshot(folder) == before
    assert (tmp_path / "baked" / DATA).stat().st_size > 0


def test_force_replaces_an_earlier_bake_and_nothing_else(tiny_model, tmp_path, capsys):
    out = tmp_path / "baked"
    assert main(["bake", str(tiny_model), "--out", str(out)]) == 0
    (out / "old.txt").write_text("old")
    assert main(["bake", str(tiny_model), "--out", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / MODEL).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked"]  # no temporary folder left
    mine = tmp_path / "mine"  # a folder of the user's own files: --force is no licence to delete it
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _expect_error(capsys, ["bake", str(tiny_model), "--out", str(mine), "--force"], "holds other files")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def _expect_error(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ortzo: error: ") and message in err, err


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_a_run_whose_step_log_lost_steps_its_checkpoints_hold_is_refused(runs, tmp_path, capsys, damage):
    """Checkpoints at steps 4 and 6 and a step log with fewer steps: eval and bake said nothing
    and used the model's untrained weights (exit 0); now one line, and no output."""
    run = tmp_path / "run"
    shutil.copytree(runs["ort"], run)
    log = run / "steps.jsonl"
    if damage == "missing":
        log.unlink()
    else:
        log.write_text("" if damage == "empty" else "".join(log.read_text().splitlines(keepends=True)[:5]))
    _expect_error(capsys, ["bake", str(run), "--out", str(tmp_path / "baked")], "missing or truncated")
    _expect_error(capsys, ["eval", str(run)], "missing or truncated")
    assert not (tmp_path / "baked").exists()


def test_bad_inputs_are_one_line_and_touch_nothing(runs, tiny_model, tmp_path, capsys):
    out = tmp_path / "baked"
    _expect_error(capsys, ["bake", str(tmp_path / "nope"), "--out", str(out)], "neither a trainable model folder")
    _expect_error(capsys, ["bake", str(tiny_model), "--out", str(out), "--step", "2"], "--step needs a run folder")
    _expect_error(capsys, ["bake", str(tiny_model)], "required: --out")
    _expect_error(capsys, ["bake", str(runs["ort"]), "--out", str(out), "--step", "7"], "cannot restore step 7")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    (corrupt / MANIFEST).write_text("{not json")
    before = _snapshot(corrupt)
    _expect_error(capsys, ["bake", str(corrupt), "--out", str(out)], "corrupt manifest")
    assert _snapshot(corrupt) == before
    configless = tmp_path / "configless"  # an exported folder that lost its Hugging Face config
    shutil.copytree(tiny_model, configless)
    (configless / HF_CONFIG).unlink()
    _expect_error(capsys, ["bake", str(configless), "--out", str(out)], "export it again")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    _expect_error(capsys, ["bake", str(tiny_model), "--out", str(out)], "not empty")
    assert (out / "mine.txt").read_text() == "precious"
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = _snapshot(model)
    for target in (model, tmp_path):  # --force never replaces what bake reads
        _expect_error(capsys, ["bake", str(model), "--out", str(target), "--force"], "lies inside --out")
    assert _snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked", "configless", "corrupt", "model"]
