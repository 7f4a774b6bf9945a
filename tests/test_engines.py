"""The PyTorch baselines against independent references: the same function as the ORT
graph, backprop's update against autograd on the Hugging Face model, torch-mezo against the
MeZO reference's arithmetic, and exact resumes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ortzo.cli import main
from ortzo.config import RunConfig
from ortzo.recipes.setup import prepare
from ortzo.tasks.objective import evaluate, loss
from ortzo.tasks.task import load_task

ENGINES = ("ort", "torch-bp", "torch-mezo")


def _setup(model, data, **settings):
    cfg = RunConfig.build({"model": str(model), "task": "sst2", "data": str(data), "batch_size": 8,
                           "train_examples": 48} | settings).resolved()
    return prepare(cfg, load_task("sst2"), say=lambda _: None)


def _reference(hf_dir):
    """The Hugging Face model as saved, and its candidate loss computed from the full logits."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

    def candidate_loss(batch):
        f = {k: torch.from_numpy(v) for k, v in batch.feeds.items()}
        logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"],
                       position_ids=f["position_ids"]).logits
        logp = torch.log_softmax(logits[:, -1], -1)[:, f["score_ids"][0]]  # left padded: last position
        return -torch.log_softmax(logp, -1)[torch.arange(len(batch.labels)), torch.from_numpy(batch.labels)].mean()

    return model, candidate_loss


def _weights(store):
    return np.concatenate([a.ravel() for a in store.arrays.values()]).astype(np.float64)


def _np(tensor):
    return tensor.detach().numpy()


def test_the_three_engines_agree_zero_shot(tiny_model, tiny_data):
    results = {}
    for engine in ENGINES:
        setup = _setup(tiny_model, tiny_data, engine=engine)
        e = setup.engine(setup.load_store())
        results[engine] = evaluate(e.score, setup.encoder, setup.splits.eval, 16)
        batch = setup.train_batch(0)
        results[engine]["train_loss"] = loss(e.score(batch.feeds), batch.labels)
    ort = results["ort"]
    assert 0 < ort["loss"] and 0 <= ort["accuracy"] <= 1
    for engine in ENGINES[1:]:
        assert results[engine]["accuracy"] == ort["accuracy"]
        assert results[engine]["loss"] == pytest.approx(ort["loss"], abs=1e-5)
        assert results[engine]["train_loss"] == pytest.approx(ort["train_loss"], abs=1e-5)


def test_backprop_step_is_autograd_sgd(tiny_hf, tiny_model, tiny_data):
    lr = 0.05
    setup = _setup(tiny_model, tiny_data, engine="torch-bp", optimizer="sgd", lr=lr, weight_decay=0.1)
    engine = setup.engine(setup.load_store())
    record = engine.step(0, lr)
    model, candidate_loss = _reference(tiny_hf)
    ref = candidate_loss(setup.train_batch(0))
    ref.backward()
    assert record.loss == pytest.approx(ref.item(), abs=1e-6) and record.lr == lr
    for name, p in model.named_parameters():
        decay = 0.1 if p.ndim >= 2 else 0.0  # matrices only
        want = (p - lr * (p.grad + decay * p)).detach()
        np.testing.assert_allclose(engine.store.arrays[name], _np(want), rtol=0,
                                   atol=1e-6, err_msg=name)


def test_backprop_momentum_and_adamw_follow_their_update_rules(tiny_hf, tiny_model, tiny_data):
    """Two steps: momentum's buffer and AdamW's moments carry over from the first. Adam divides
    by sqrt(v) + 1e-8, so where a gradient is near 1e-8 (rows of the tied embedding the batch
    barely touches) float-level differences in g are amplified: there AdamW is only checked to
    move each weight by at most lr per step."""
    mu = 0.9
    for optimizer, lr in (("momentum", 0.05), ("adamw", 1e-4)):  # Adam moves every touched weight by ~lr
        setup = _setup(tiny_model, tiny_data, engine="torch-bp", optimizer=optimizer, lr=lr)
        engine = setup.engine(setup.load_store())
        model, candidate_loss = _reference(tiny_hf)
        state, smallest = {}, {}
        for step in range(2):
            engine.step(step, lr)
            model.zero_grad()
            candidate_loss(setup.train_batch(step)).backward()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    g = p.grad
                    smallest[name] = torch.minimum(smallest.get(name, g.abs()), g.abs())
                    if optimizer == "momentum":
                        state[name] = g.clone() if step == 0 else mu * state[name] + g
                        p -= lr * state[name]
                    else:  # AdamW, betas (0.9, 0.999), eps 1e-8, no decay set
                        m, v = state.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
                        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                        state[name] = (m, v)
                        t = step + 1
                        p -= lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        checked = 0
        for name, p in model.named_parameters():
            got, want = engine.store.arrays[name], _np(p)
            if optimizer == "adamw":
                sure = _np(smallest[name]) > 1e-5
                checked += sure.sum()
                np.testing.assert_allclose(got[sure], want[sure], rtol=0, atol=lr / 100, err_msg=f"{optimizer} {name}")
                assert np.abs(got - want).max() <= 2 * lr
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"{optimizer} {name}")
        assert optimizer == "momentum" or checked > 0.3 * sum(a.size for a in engine.store.arrays.values())


def test_checkpointing_layers_changes_memory_not_the_update(tiny_model, tiny_data):
    stores, saved = {}, {}
    for fraction in (0.0, 1.0):
        setup = _setup(tiny_model, tiny_data, engine="torch-bp", optimizer="sgd", lr=0.05,
                       checkpoint_fraction=fraction)
        engine = setup.engine(setup.load_store())
        sizes = []

        def pack(t):
            sizes.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            engine.step(0, 0.05)
        stores[fraction], saved[fraction] = engine.store, sum(sizes)
    for name, a in stores[0.0].arrays.items():
        np.testing.assert_array_equal(a, stores[1.0].arrays[name], err_msg=name)
    assert saved[1.0] < 0.7 * saved[0.0]


@pytest.mark.parametrize("engine,extra", [("ort", {"params": "all", "clip": "none"}), ("torch-mezo", {}),
                                          ("torch-bp", {"optimizer": "sgd"})])
def test_every_engine_steps_at_the_lr_it_is_given(tiny_model, tiny_data, engine, extra):
    """The recipe's schedule picks each step's lr, not the config's --lr: the same step at 3x
    the lr moves every weight 3x as far (each update is linear in the lr) and logs that lr."""
    moved = {}
    for lr in (1e-3, 3e-3):
        setup = _setup(tiny_model, tiny_data, engine=engine, lr=0.5, **extra)  # never the lr used
        e = setup.engine(setup.load_store())
        before = _weights(e.store)
        assert e.step(0, lr).lr == lr
        moved[lr] = _weights(e.store) - before
    assert np.abs(moved[1e-3]).max() > 0
    np.testing.assert_allclose(moved[3e-3], 3 * moved[1e-3], rtol=0, atol=1e-6)


def test_torch_mezo_step_is_the_reference_arithmetic(tiny_hf, tiny_model, tiny_data):
    """MeZO's trainer: z ~ N(0, 1) per parameter from torch's generator seeded by the step's
    seed, in parameter order; g = (L(w + eps z) - L(w - eps z)) / 2 eps; w <- w - lr (g z + wd w)."""
    eps, lr, wd = 1e-2, 1e-3, 0.5
    setup = _setup(tiny_model, tiny_data, engine="torch-mezo", lr=lr, eps=eps, weight_decay=wd)
    engine = setup.engine(setup.load_store())
    record = engine.step(0, lr)
    model, candidate_loss = _reference(tiny_hf)
    params = list(model.named_parameters())
    torch.manual_seed(record.seed)
    z = {name: torch.normal(0.0, 1.0, size=p.shape) for name, p in params}
    batch = setup.train_batch(0)
    with torch.no_grad():
        w = {name: p.clone() for name, p in params}
        for name, p in params:
            p.copy_(w[name] + eps * z[name])
        lp = float(candidate_loss(batch))
        for name, p in params:
            p.copy_(w[name] - eps * z[name])
        lm = float(candidate_loss(batch))
    g = (lp - lm) / (2 * eps)
    assert record.loss_plus[0] == pytest.approx(lp, abs=1e-5) and record.loss_minus[0] == pytest.approx(lm, abs=1e-5)
    assert record.grads[0] == pytest.approx(g, rel=1e-3, abs=1e-3)
    for name, _ in params:
        decay = wd if w[name].ndim >= 2 else 0.0
        want = w[name] - lr * (record.grads[0] * z[name] + decay * w[name])
        np.testing.assert_allclose(engine.store.arrays[name], _np(want), rtol=0,
                                   atol=2e-6, err_msg=name)


@pytest.mark.parametrize("engine, extra, update", [
    ("torch-bp", ["--optimizer", "adamw", "--checkpoint-fraction", "0.5"], "random), backprop with adamw, weight"),
    ("torch-mezo", ["--lr", "1e-3"], "random), eps 0.001, mezo in PyTorch with 1 x gaussian direction, weight")])
def test_a_torch_run_resumes_to_the_uninterrupted_weights(tiny_model, tiny_data, tmp_path, engine, extra, update,
                                                          capsys):
    """Killed after logging step 6 and before its checkpoint: the resume opens checkpoint 4
    (weights and, for backprop, optimizer state) and recomputes or replays steps 4 and 5. The
    recipe line names the update the engine makes (a backprop run has no eps, clip or directions)."""
    args = ["finetune", str(tiny_model), "--data", str(tiny_data), "--task", "sst2", "--engine", engine,
            "--batch-size", "8", "--train-examples", "48", "--eval-every", "3", "--checkpoint-every", "2",
            "--lr", "1e-3", *extra]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(args + ["--out", str(whole), "--steps", "7"]) == 0
    assert update in capsys.readouterr().err
    assert main(args + ["--out", str(parts), "--steps", "6"]) == 0
    shutil.rmtree(parts / "checkpoints" / "step-0000006")
    assert main(["finetune", "--resume", "--out", str(parts), "--steps", "7"]) == 0
    final = "checkpoints/step-0000007/weights.bin"
    assert (whole / final).read_bytes() == (parts / final).read_bytes()
    rows = [[{k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "peak_rss_mib"}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, parts)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [0, 3, 6, 7]
    assert all(json.loads(line)["peak_rss_mib"] > 100 for line in (whole / "metrics.jsonl").read_text().splitlines())
    assert main(["eval", str(parts), "--step", "6"]) == 0


def test_engine_options_are_checked(tiny_model, tiny_data, tmp_path, tiny_model_fp16, capsys):
    base = ["finetune", str(tiny_model), "--data", str(tiny_data), "--task", "sst2", "--out", str(tmp_path / "r")]
    for extra, message in ((["--engine", "torch-bp", "--clip", "1"], "--clip: not used by --engine torch-bp"),
                           (["--optimizer", "sgd"], "--optimizer: not used by --engine ort"),
                           (["--engine", "torch-mezo", "--n-directions", "2"], "--n-directions: not used"),
                           (["--engine", "torch-bp", "--checkpoint-fraction", "2"], "--checkpoint-fraction"),
                           (["--engine", "torch-bp", "--provider", "cuda"], "runs on the CPU only")):
        capsys.readouterr()
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    capsys.readouterr()
    assert main(["finetune", str(tiny_model_fp16), "--data", str(tiny_data), "--task", "sst2", "--out",
                 str(tmp_path / "r"), "--engine", "torch-bp"]) == 2
    assert "need a float32 export" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def lora_bases(tiny_model, tmp_path_factory):
    """The tiny model's frozen bases with LoRA on q and v: fp32 matrices, and int4 at accuracy
    level 0 (fp32 compute from the dequantized blocks, so ORT and PyTorch agree closely)."""
    from ortzo.model.frozen import freeze
    from ortzo.model.lora import LoraSpec
    from ortzo.model.quantize import QuantSpec

    root = tmp_path_factory.mktemp("lora-bases")
    spec = LoraSpec.parse("r=4,alpha=8,targets=*q_proj,*v_proj")
    freeze(tiny_model, root / "fp32", None, spec)
    freeze(tiny_model, root / "int4", QuantSpec(4, 16, accuracy_level=0), spec)
    return root


@pytest.mark.parametrize("base,atol", [("fp32", 2e-5), ("int4", 1e-4)])
def test_torch_baselines_over_a_frozen_base_score_what_ort_scores(lora_bases, tiny_data, base, atol):
    """The PyTorch model rebuilt from the base (int4 matrices dequantized) with the LoRA hooked
    on: with B != 0 its scores equal the ORT graph's, for backprop and torch-mezo alike."""
    results = {}
    for engine in ENGINES:
        setup = _setup(lora_bases / base, tiny_data, engine=engine, include=["*"])
        store = setup.load_store()
        rng = np.random.default_rng(3)
        for name, arr in store.arrays.items():
            if name.endswith("lora_B.weight"):
                arr[...] = rng.normal(0, 0.5, arr.shape)
        e = setup.engine(store)
        results[engine] = e.score(setup.train_batch(0).feeds)
    assert np.abs(results["ort"]).max() > 0
    for engine in ENGINES[1:]:
        np.testing.assert_allclose(results[engine], results["ort"], rtol=0, atol=atol, err_msg=engine)


def test_backprop_over_a_frozen_base_trains_the_lora_as_autograd_does(tiny_hf, lora_bases, tiny_data):
    """One SGD step of torch-bp on the LoRA and vectors of the fp32 base: each tensor moves by
    -lr x the gradient that autograd gives on the Hugging Face model with the LoRA branch added
    here (A random, B = 0 at the start: only B and the vectors get a gradient through it)."""
    lr = 0.5
    setup = _setup(lora_bases / "fp32", tiny_data, engine="torch-bp", optimizer="sgd", lr=lr, weight_decay=0.0,
                   include=["*"])
    store = setup.load_store()
    start = {n: a.copy() for n, a in store.arrays.items()}  # the folder's layout: A [in, r], B [r, out]
    engine = setup.engine(store)
    record = engine.step(0, lr)

    model, candidate_loss = _reference(tiny_hf)
    modules = dict(model.named_modules())
    lora = {}
    for name in start:
        if name.endswith("lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            a = torch.tensor(start[name], requires_grad=True)                           # [in, r]
            b = torch.tensor(start[f"{module}.lora_B.weight"], requires_grad=True)      # [r, out]
            lora[module] = (a, b)
            modules[module].register_forward_hook(lambda m, args, out, a=a, b=b: out + 2.0 * (args[0] @ a) @ b)
    ref = candidate_loss(setup.train_batch(0))
    ref.backward()
    assert record.loss == pytest.approx(ref.item(), abs=1e-6)
    params = dict(model.named_parameters())
    moved = 0
    for name, before in start.items():
        module = name.rsplit(".lora_", 1)[0]
        grad = (lora[module][0 if ".lora_A." in name else 1].grad if ".lora_" in name else params[name].grad).numpy()
        want = before - lr * grad
        got = engine.store.arrays[name]
        np.testing.assert_allclose(got.T if ".lora_" in name else got, want, rtol=0, atol=1e-6, err_msg=name)
        moved += bool(np.abs(want - before).max() > 1e-4)
    assert moved > len(lora)  # B of every module and the vectors moved


def test_a_corrupt_frozen_base_is_one_line_for_the_pytorch_baselines(lora_bases, tiny_data, tmp_path, capsys):
    """A base record naming a tensor its graph does not store: one line, exit 2, no run."""
    broken = tmp_path / "broken"
    shutil.copytree(lora_bases / "int4", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["base"]["frozen"][1]["name"] = "model.layers.0.self_attn.nothing.weight"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code = main(["finetune", str(broken), "--task", "sst2", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                 "--engine", "torch-bp", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "the folder is corrupt" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "steps.jsonl").exists()
