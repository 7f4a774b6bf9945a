"""The mobile path: the graph in ORT format (`ortzo mobile`, `ortzo export --format ort`) scores
and trains exactly as the ONNX graph does on the same bound weights, its required-operators
config is the graph's own operator set, and the bench measures both formats."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ortzo.cli import main
from ortzo.errors import OrtzoError
from ortzo.model.manifest import MANIFEST, Manifest
from ortzo.model.mobile import OPERATORS, required_operators
from ortzo.model.session import ScoringSession
from ortzo.model.targets import load_target
from ortzo.model.weights import WeightStore
from ortzo.optim.directions import Directions
from ortzo.optim.mezo import mezo_step
from ortzo.tasks.batches import collate
from ortzo.tasks.objective import loss

ENCODED = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [5, 5, 6]]
LABELS = np.array([0, 1, 1, 0])
CANDIDATES = np.array([30, 31])


@pytest.fixture(scope="module")
def ort_model(tiny_model, tmp_path_factory) -> Path:
    """A copy of the tiny folder with the graph in ORT format added by `ortzo mobile`."""
    folder = tmp_path_factory.mktemp("mobile") / "tiny"
    shutil.copytree(tiny_model, folder)
    assert main(["mobile", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def frozen_ort(tiny_hf, tmp_path_factory) -> Path:
    """`ortzo export --format ort` of an int4 base with LoRA on q and v."""
    out = tmp_path_factory.mktemp("mobile-frozen") / "int4-lora"
    assert main(["export", str(tiny_hf), "--out", str(out), "--format", "ort", "--quantize", "int4",
                 "--lora", "r=2,alpha=4,targets=*q_proj,*v_proj", "--quiet"]) == 0
    return out


def _sessions(folder: Path, store: WeightStore) -> tuple[ScoringSession, ScoringSession]:
    """(the .onnx session, the .ort session), both on the CPU provider, over the same store."""
    onnx_session = ScoringSession(folder, store, load_target("cpu"))
    ort_session = ScoringSession(folder, store, load_target("mobile-cpu"))
    assert Path(ort_session.session._model_path) == folder / "model.ort"
    assert Path(onnx_session.session._model_path) == folder / "model.onnx"
    return onnx_session, ort_session


def test_mobile_adds_the_ort_graph_and_changes_nothing_else(tiny_model, ort_model):
    before, after = Manifest.load(tiny_model), Manifest.load(ort_model)
    assert after.ort_graph == "model.ort" and after.graph == "model.onnx" and before.ort_graph is None
    assert after.to_json() | {"ort_graph": None} == before.to_json()
    for name in ("model.onnx", "weights.bin", "tokenizer.json"):
        assert (ort_model / name).read_bytes() == (tiny_model / name).read_bytes(), name
    # the weights stay graph inputs: the .ort file holds none of them
    inputs = {i.name for i in ort.InferenceSession(str(ort_model / "model.ort")).get_inputs()}
    assert {p.name for p in after.parameters} <= inputs


@pytest.mark.parametrize("folder", ["ort_model", "frozen_ort"])
def test_ort_graph_scores_like_the_onnx_graph_and_sees_in_place_edits(folder, request):
    ort_model = request.getfixturevalue(folder)
    store = WeightStore.load(ort_model, Manifest.load(ort_model))
    onnx_session, ort_session = _sessions(ort_model, store)
    feeds = collate(ENCODED, 1, CANDIDATES)
    before = ort_session(feeds)
    np.testing.assert_array_equal(before, onnx_session(feeds))
    for name, arr in store.arrays.items():
        assert ort_session.weight_ptr(name) == arr.ctypes.data, name  # zero-copy, as on the .onnx graph
    rng = np.random.default_rng(0)
    for arr in store.arrays.values():  # every trained tensor (a frozen base's LoRA B leaves B = 0)
        arr += rng.normal(0, 0.05, arr.shape).astype(arr.dtype)
    after = ort_session(feeds)
    assert np.abs(after - before).max() > 1e-3, "the .ort session ignored in-place weight edits"
    np.testing.assert_array_equal(after, onnx_session(feeds))


@pytest.mark.parametrize("folder", ["ort_model", "frozen_ort"])
def test_mezo_steps_on_the_ort_graph_equal_those_on_the_onnx_graph(folder, request):
    """Two stores from the same file, one session each: the same seeds give the same records
    and the same weights, bit for bit."""
    ort_model = request.getfixturevalue(folder)
    manifest = Manifest.load(ort_model)
    feeds = collate(ENCODED, 1, CANDIDATES)
    runs = []
    for target in ("cpu", "mobile-cpu"):
        store = WeightStore.load(ort_model, manifest)
        session = ScoringSession(ort_model, store, load_target(target))
        buffers, directions = list(store.arrays.values()), Directions()
        records = [mezo_step(buffers, lambda: loss(session(feeds), LABELS), step=k, seed=100 + k, eps=1e-3, lr=1e-2,
                             directions=directions) for k in range(3)]
        runs.append((records, store))
    (onnx_records, onnx_store), (ort_records, ort_store) = runs
    assert [r.to_json() for r in ort_records] == [r.to_json() for r in onnx_records]
    assert all(g != 0 for r in ort_records for g in r.grads)
    original = WeightStore.load(ort_model, manifest)
    assert any(not np.array_equal(a, original.arrays[n]) for n, a in ort_store.arrays.items())  # they moved
    for name, arr in ort_store.arrays.items():
        np.testing.assert_array_equal(arr, onnx_store.arrays[name], err_msg=name)


def _op_types(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}


def test_required_operators_are_the_ort_graphs_own(ort_model, tmp_path):
    """The .ort graph is model.onnx after the CPU provider's optimizations (style Fixed, no
    NCHWc): rebuilt here as ONNX by a session of its own, its nodes' op types are the config's."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(ort_model / "model.onnx"), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["NchwcTransformer"])
    optimized = _op_types(onnx.load(so.optimized_model_filepath))
    listed = {(domain, op) for (domain, _), ops in required_operators(ort_model).items() for op in ops}
    assert listed == optimized
    raw = _op_types(onnx.load(ort_model / "model.onnx"))
    assert ("com.microsoft", "FusedMatMul") in listed and raw != listed  # fused: not the unoptimized graph's
    assert (ort_model / OPERATORS).read_text().splitlines()[:2] == ["# Generated from model/s:", "# - model.ort"]


def test_export_format_ort_writes_both_graphs(tiny_hf, tiny_model, tmp_path, capfd):
    out = tmp_path / "tiny-ort"
    assert main(["export", str(tiny_hf), "--out", str(out), "--format", "ort"]) == 0
    lines = capfd.readouterr().err.splitlines()
    assert [line[:5] for line in lines if line.startswith("[")][-2:] == ["[5/5]"] * 2
    m = Manifest.load(out)
    assert (m.graph, m.ort_graph) == ("model.onnx", "model.ort") and (out / OPERATORS).is_file()
    assert m.weights_sha256 == Manifest.load(tiny_model).weights_sha256


def test_a_frozen_base_goes_inside_the_ort_graph_and_a_too_large_one_is_refused(frozen_ort, tmp_path, monkeypatch):
    """The quantized matrices are constants, so the .ort file carries them (the trained tensors
    stay inputs) and its operators include MatMulNBits; a base past a flatbuffer's 2 GiB is one
    line before the converter runs, the folder untouched."""
    import ortzo.model.mobile

    m = Manifest.load(frozen_ort)
    assert m.ort_graph == "model.ort" and (frozen_ort / "model.ort").stat().st_size > m.base["data_bytes"]
    session = ort.InferenceSession(str(frozen_ort / "model.ort"))
    overridable = {i.name for i in session.get_overridable_initializers()}  # what a store binds
    assert {p.name for p in m.parameters} == overridable
    assert not {f["name"] for f in m.base["frozen"]} & (overridable | {i.name for i in session.get_inputs()})
    assert "MatMulNBits" in required_operators(frozen_ort)[("com.microsoft", 1)]
    folder = tmp_path / "big"
    shutil.copytree(frozen_ort, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(ortzo.model.mobile, "FLATBUFFER_BYTES", m.base["data_bytes"])
    with pytest.raises(OrtzoError, match=r"does not fit an ORT-format file .*phones run its model.onnx$"):
        ortzo.model.mobile.add_ort_graph(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_folder_without_the_ort_graph_still_loads_and_mobile_targets_say_why(tiny_model, tmp_path, capfd):
    """Manifests written before `ort_graph` existed load; a target that needs the .ort graph,
    and the bench on it, fail in one line."""
    folder = tmp_path / "old"
    shutil.copytree(tiny_model, folder)
    d = json.loads((folder / MANIFEST).read_text())
    d.pop("ort_graph", None)
    (folder / MANIFEST).write_text(json.dumps(d))
    m = Manifest.load(folder)
    assert m.ort_graph is None
    with pytest.raises(OrtzoError, match="add it with `ortzo mobile FOLDER`"):
        ScoringSession(folder, WeightStore.load(folder, m), load_target("mobile-cpu"))
    assert main(["bench", str(folder), "--directions", "--formats", "onnx", "ort"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "--format ort" in err
    (folder / MANIFEST).write_text(json.dumps(d | {"ort_graph": "model.ort"}))
    with pytest.raises(OrtzoError, match="missing model.ort"):
        Manifest.load(folder)


def test_bench_times_both_formats_and_measures_phone_memory(ort_model, tmp_path, capfd):
    assert main(["bench", str(ort_model), "--directions", "--formats", "onnx", "ort", "--batch-size", "2",
                 "--seq-len", "8", "--repeats", "2"]) == 0
    out = capfd.readouterr().out
    assert "graph formats interleaved" in out and "\nort " in out and "\nonnx " in out
    rows_file = tmp_path / "phone.jsonl"
    assert main(["bench", str(ort_model), "--directions", "--provider", "mobile-cpu", "--memory", "1x8", "2x16",
                 "--out", str(rows_file)]) == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["batch"], r["seq"], r["graph"]) for r in rows] == [(1, 8, "model.ort"), (2, 16, "model.ort")]
    assert all(50 < r["inference_mib"] < 200 and r["mezo_step_mib"] >= 0.9 * r["inference_mib"] for r in rows)
    assert main(["bench", str(ort_model), "--directions", "--memory", "8"]) == 2
    assert main(["bench", str(ort_model), "--directions", "--out", str(rows_file)]) == 2


def test_phone_memory_of_a_frozen_base_is_predicted_with_its_base(frozen_ort, tmp_path):
    """The memory model's column prices the frozen base the folder has (int4, blocks of 32,
    int8 tables, LoRA r=2: export's settings, written out here), not fp32 weights."""
    from ortzo import memory

    rows_file = tmp_path / "phone.jsonl"
    assert main(["bench", str(frozen_ort), "--directions", "--provider", "mobile-cpu", "--memory", "2x16",
                 "--out", str(rows_file)]) == 0
    (row,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    config = json.loads((frozen_ort / "hf_config.json").read_text())
    want = memory.estimate(config, 2, 16, padded=False, base="int4", block_size=32, symmetric=False, embedding=8,
                           lora_rank=2)
    assert row["graph"] == "model.ort" and row["predicted_step_mib"] == round(want.total / 2**20, 2)


def test_placement_follows_each_providers_rules_for_weights_as_inputs(tiny_model):
    """Counted here from the graph itself: a MatMul whose B is a weight (a graph input) goes to
    none of XNNPACK, NNAPI or CoreML NeuralNetwork, but to CoreML ML Program; NNAPI's batch
    MatMul takes the others (attention, rotary); of the providers only NNAPI takes the head's
    Gemm (transB = 1)."""
    from ortzo.model.placement import report

    tables = report(tiny_model, ["xnnpack", "nnapi", "coreml-nn", "coreml"], 2, 8)
    params = {p.name for p in Manifest.load(tiny_model).parameters}
    matmuls = [n for n in onnx.load(tiny_model / "model.onnx").graph.node if n.op_type == "MatMul"]
    weight_b = sum(n.input[1] in params for n in matmuls)
    assert 0 < weight_b < len(matmuls)

    def nodes(provider: str, op: str, taken: bool | None) -> int:
        return sum(r["nodes"] for r in tables[provider] if r["op"] == op and r["taken"] is taken)

    for p in ("xnnpack", "coreml-nn"):
        assert nodes(p, "MatMul", False) == len(matmuls), p
    assert (nodes("nnapi", "MatMul", False), nodes("nnapi", "MatMul", True)) == (weight_b, len(matmuls) - weight_b)
    assert nodes("coreml", "MatMul", True) == len(matmuls)
    assert nodes("nnapi", "Gemm", True) == 1
    assert all(nodes(p, "Gemm", False) == 1 for p in ("xnnpack", "coreml-nn", "coreml"))
    assert all(r["source"].endswith("(06dd121)") for r in tables["xnnpack"] if r["op"] == "MatMul")
    assert len({sum(r["nodes"] for r in rows) for rows in tables.values()}) == 1  # every node, once each


def test_placement_reads_orts_own_partitioning_where_the_provider_starts(tiny_model, monkeypatch, capfd):
    """No mobile provider starts here, so the CPU provider stands in for one: every node is
    then ORT's assignment, and the CLI prints the summary; a provider it does not know is one
    line and exit 2."""
    from ortzo.model import placement

    monkeypatch.setitem(placement.EP_NAMES, "xnnpack", "CPUExecutionProvider")
    rows = placement.report(tiny_model, ["xnnpack"], 1, 8)["xnnpack"]
    assert all(r["taken"] and r["source"].startswith("ORT partitioning (built into onnxruntime") for r in rows)
    capfd.readouterr()
    assert main(["placement", str(tiny_model), "--provider", "nnapi", "--seq-len", "8"]) == 0
    assert "| nnapi | documented rules |" in capfd.readouterr().out
    assert main(["placement", str(tiny_model), "--provider", "tpu"]) == 2
