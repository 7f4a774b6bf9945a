"""Prompts, label words, padding and truncation, and reproducible splits."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ortzo.tasks.batches import Encoder
from ortzo.tasks.data import batch_indices, data_source, load_split, make_splits
from ortzo.errors import OrtzoError
from ortzo.model.manifest import Manifest
from ortzo.tasks.task import BUILTIN, load_task
from ortzo.model.tokenizer import Tokenizer

from conftest import SHARED_DATA


def _tokenizer(folder):
    return Tokenizer(folder, Manifest.load(folder).tokenizer)


def test_sst2_prompt_is_mezos():
    t = BUILTIN["sst2"]
    assert t.prompt({"sentence": "a charming journey . ", "label": 1}) == "a charming journey . It was"
    assert t.label_words == (" terrible", " great")


def test_batch_left_pads_and_scores_the_last_position(tiny_model):
    from dataclasses import replace

    enc = Encoder(replace(BUILTIN["sst2"], label_words=(" No", " Yes")), _tokenizer(tiny_model))
    assert enc.single_token  # one token per word (in the tiny vocabulary): one sequence per example
    ids = [enc.encode({"sentence": s}) for s in ("great", "the film was boring and dull")]
    b = enc.batch(ids, [1, 0])
    s = b.feeds["input_ids"].shape[1]
    assert s == max(map(len, ids))
    short = len(ids[0])
    np.testing.assert_array_equal(b.feeds["attention_mask"][0], [0] * (s - short) + [1] * short)
    np.testing.assert_array_equal(b.feeds["input_ids"][0, s - short:], ids[0])
    np.testing.assert_array_equal(b.feeds["position_ids"][0, s - short:], np.arange(short))
    np.testing.assert_array_equal(b.feeds["score_index"], [s - 1, 2 * s - 1])
    np.testing.assert_array_equal(b.feeds["score_ids"], np.tile(enc.label_ids, (2, 1)))


def test_long_passage_is_cut_from_its_left_and_the_question_kept(tiny_model):
    enc = Encoder(BUILTIN["boolq"], _tokenizer(tiny_model), max_length=40)
    example = {"passage": " ".join(f"w{i}" for i in range(200)), "question": "is the plot good", "label": 1}
    ids = enc.encode(example)
    text = enc.tokenizer.decode(ids)
    assert len(ids) <= 40
    assert text.endswith("Question: is the plot good?\nAnswer:")
    assert "w199" in text and "w0 " not in text


def test_custom_task_spec(tmp_path, tiny_data):
    spec = tmp_path / "mine.toml"
    spec.write_text(f'name = "mine"\ntemplate = "Review: {{sentence}}\\nSentiment:"\n'
                    f'label_words = [" bad", " good"]\ndata = "{tiny_data}"\n')
    task = load_task(str(spec))
    assert task.fields == ("sentence",) and task.data == str(tiny_data)
    assert len(load_split(task, data_source(task, None), "train")) == 64


@pytest.mark.parametrize("text,error", [
    ('template = "{x}"\nlabel_words = [" a"]', "label_words: List should have at least 2 items"),
    ('label_words = [" a", " b"]', "missing key 'template'"),
    ('template = "{x}"\nlabel_words = [" a", " b"]\nlable_field = "y"',
     "unknown key 'lable_field' (valid keys: name, template, label_words, label_field, truncate_field, data, "
     "train_split, eval_split)"),
    ('template = "{x}"\nlabel_words = " a"', "label_words: Input should be a valid list (got ' a')"),
    ('template = "{x}"\nlabel_words = [" a", 3]', "label_words.1: Input should be a valid string (got 3)"),
    ('template = "x"\nlabel_words = [" a", " b"]', "template: the template has no {field} placeholder"),
    ('template = "{x}"\nlabel_words = [" a", " b"]\neval_split = 3', "eval_split: Input should be a valid string (got 3)"),
    ('template = "{x}"\nlabel_words = [" a", " b"]\ntruncate_field = "y"', "truncate_field 'y' is not in the template"),
    ('template = "{x"\nlabel_words = [" a", " b"]', "bad.toml: template: expected '}' before end of string"),
])
def test_bad_task_spec(tmp_path, text, error):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    with pytest.raises(OrtzoError, match=re.escape(error)):
        load_task(str(spec))


def test_wrong_data_schema_names_file_line_and_field(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "validation.jsonl").write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(OrtzoError, match=r"validation.jsonl:1: missing field 'sentence'"):
        load_split(BUILTIN["sst2"], data_source(BUILTIN["sst2"], str(folder)), "validation")
    (folder / "validation.jsonl").write_text(json.dumps({"sentence": "x", "label": 7}) + "\n")
    with pytest.raises(OrtzoError, match="label 7"):
        load_split(BUILTIN["sst2"], data_source(BUILTIN["sst2"], str(folder)), "validation")


def test_splits_are_reproducible_and_k_shot_is_per_class(tiny_data):
    task = BUILTIN["sst2"]
    a = make_splits(task, str(tiny_data), train_examples=20, seed=3)
    b = make_splits(task, str(tiny_data), train_examples=20, seed=3)
    c = make_splits(task, str(tiny_data), train_examples=20, seed=4)
    assert a.train == b.train and a.train != c.train and len(a.train) == 20 and len(a.eval) == 32
    k = make_splits(task, str(tiny_data), k_shot=5, seed=0)
    assert sorted(r["label"] for r in k.train) == [0] * 5 + [1] * 5
    d = make_splits(task, str(tiny_data), train_examples=20, dev_examples=10, seed=3)
    assert d.train == a.train and len(d.dev) == 10
    assert not {r["idx"] for r in d.dev} & {r["idx"] for r in d.train}
    with pytest.raises(OrtzoError, match="for dev"):
        make_splits(task, str(tiny_data), train_examples=60, dev_examples=10)


@pytest.mark.skipif(not (SHARED_DATA / "boolq").is_dir(), reason="needs ../shared/data")
def test_boolq_held_out_part_does_not_depend_on_evaluation_flags():
    """BoolQ ships validation only: a fixed third is held out, whatever --eval-examples says."""
    full = make_splits(BUILTIN["boolq"], str(SHARED_DATA / "boolq"), train_examples=None)
    assert full.note and "no train split" in full.note
    assert len(full.train) + len(full.eval) == 3270 and len(full.eval) == 1090
    train_ids, eval_ids = {r["idx"] for r in full.train}, {r["idx"] for r in full.eval}
    assert not train_ids & eval_ids
    for n in (500, 2000):  # 2000 > the held-out part: all of it, never a training row
        s = make_splits(BUILTIN["boolq"], str(SHARED_DATA / "boolq"), train_examples=None, eval_examples=n, seed=9)
        assert {r["idx"] for r in s.train} == train_ids
        assert {r["idx"] for r in s.eval} <= eval_ids and len(s.eval) == min(n, 1090)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("task", sorted(BUILTIN))
def test_builtin_tasks_read_the_shared_data(task):
    rows = load_split(BUILTIN[task], data_source(BUILTIN[task], str(SHARED_DATA / task)), "validation")
    assert rows and BUILTIN[task].prompt(rows[0])


def _folder(tmp_path, **splits):
    folder = tmp_path / "d"
    folder.mkdir(exist_ok=True)
    for name, n in splits.items():
        rows = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(n)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_splits_are_chosen_by_name_or_file(tmp_path):
    folder = _folder(tmp_path, train=10, test=6)
    task = BUILTIN["sst2"]
    with pytest.raises(OrtzoError, match=r"validation.jsonl not found \(.* has test.jsonl, train.jsonl\); "
                                          r"choose the split with --eval-split"):
        make_splits(task, str(folder))
    s = make_splits(task, str(folder), eval_split="test")
    assert len(s.train) == 10 and len(s.eval) == 6
    s = make_splits(task, str(folder), train_split="test.jsonl", eval_split=str(folder / "train.jsonl"))
    assert len(s.train) == 6 and len(s.eval) == 10
    with pytest.raises(OrtzoError, match="dev.jsonl not found"):
        make_splits(task, str(folder), train_split="dev", eval_split="test")


def test_a_spec_chooses_its_splits_and_data_relative_to_itself(tmp_path):
    _folder(tmp_path, train=10, test=6)
    spec = tmp_path / "t.toml"
    spec.write_text('template = "{sentence} It was"\nlabel_words = [" bad", " good"]\ndata = "d"\n'
                    'eval_split = "test"\n')
    task = load_task(str(spec))
    assert task.name == "t" and task.data == str(tmp_path / "d") and task.eval_split == "test"
    assert len(make_splits(task, None).eval) == 6


def test_data_paths_and_hub_names_are_told_apart(tmp_path):
    folder = _folder(tmp_path, validation=4)
    task = BUILTIN["sst2"]
    with pytest.raises(OrtzoError, match="is a file"):
        data_source(task, str(folder / "validation.jsonl"))
    with pytest.raises(OrtzoError, match="data folder not found: shared/data/sst2"):
        data_source(task, "shared/data/sst2")  # a mistyped relative path is no hub name
    assert data_source(task, "hub:glue:sst2").hub == "glue:sst2"
    assert data_source(task, str(folder)).folder == folder


def test_blank_lines_are_skipped(tmp_path):
    folder = _folder(tmp_path, validation=3)
    with open(folder / "validation.jsonl", "a") as f:
        f.write("\n  \n")
    assert len(load_split(BUILTIN["sst2"], data_source(BUILTIN["sst2"], str(folder)), "validation")) == 3


def test_the_evaluation_sample_depends_only_on_seed_and_size(tiny_data):
    task = BUILTIN["sst2"]
    a = make_splits(task, str(tiny_data), train_examples=20, eval_examples=10, seed=3)
    b = make_splits(task, str(tiny_data), train_examples=30, dev_examples=8, eval_examples=10, seed=3)
    c = make_splits(task, str(tiny_data), k_shot=4, eval_examples=10, seed=3)
    assert a.eval == b.eval == c.eval
    assert a.eval != make_splits(task, str(tiny_data), eval_examples=10, seed=4).eval


def test_truncation_keeps_the_start_token(tiny_model):
    from ortzo.model.tokenizer import Tokenizer as Tok

    tok = Tok(tiny_model, Manifest.load(tiny_model).tokenizer | {"add_bos": True, "bos_id": 0})
    enc = Encoder(BUILTIN["sst2"], tok, max_length=6)  # sst2 has no truncate field
    ids = enc.encode({"sentence": "the film was great and the acting was good and the plot"})
    assert len(ids) == 6 and ids[0] == 0
    assert ids[1:] == tok.encode("the film was great and the acting was good and the plot It was")[-5:]
    boolq = Encoder(BUILTIN["boolq"], tok, max_length=20)
    long = boolq.encode({"passage": " ".join(["plot"] * 50), "question": "is it good"})
    assert len(long) <= 20 and long[0] == 0


def test_batches_are_slices_of_one_permutation_per_epoch():
    n, bs, seed = 10, 3, 7
    per_epoch = n // bs
    for epoch in range(3):
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        got = [batch_indices(n, bs, epoch * per_epoch + k, seed) for k in range(per_epoch)]
        for k, b in enumerate(got):
            np.testing.assert_array_equal(b, perm[k * bs:(k + 1) * bs])
        assert len(set(np.concatenate(got).tolist())) == per_epoch * bs  # no repeats within an epoch
    assert not np.array_equal(batch_indices(n, bs, 0, seed), batch_indices(n, bs, per_epoch, seed))


def test_batches_grouped_by_length_are_the_sorted_runs_of_the_same_random_batches():
    n, bs, group, seed = 50, 4, 3, 5
    lengths = np.random.default_rng(1).integers(1, 60, size=n)
    per_epoch = n // bs  # 12: four runs of 3 batches
    for epoch in range(2):
        plain = [batch_indices(n, bs, epoch * per_epoch + k, seed) for k in range(per_epoch)]
        got = [batch_indices(n, bs, epoch * per_epoch + k, seed, lengths, group) for k in range(per_epoch)]
        for run in range(per_epoch // group):
            mine = got[run * group:(run + 1) * group]
            # the run holds the same examples as the random batches it replaces ...
            assert sorted(np.concatenate(mine).tolist()) == sorted(np.concatenate(plain[run * group:(run + 1) *
                                                                                        group]).tolist())
            # ... cut into batches of neighbours in length: no two batches' length ranges overlap
            spans = sorted((lengths[b].min(), lengths[b].max()) for b in mine)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    rand = np.mean([lengths[b].max() for b in plain])
    grouped = np.mean([lengths[b].max() for b in got])
    assert grouped < 0.85 * rand  # the padded length a forward computes
    assert not all(lengths[got[k]].max() <= lengths[got[k + 1]].min() for k in range(group - 1))  # order: shuffled


def test_named_templates_of_the_built_in_tasks():
    from ortzo.tasks.task import TEMPLATES, templates

    review = load_task("sst2", "review")
    assert review.prompt({"sentence": " a charming journey . "}) == "Review: a charming journey .\nSentiment:"
    assert review.label_words == (" negative", " positive") and review.template_name == "review"
    assert load_task("sst2", "mezo") == BUILTIN["sst2"]
    assert load_task("sst2") == load_task("sst2", "review-demos")  # the default: measured best
    assert [load_task(t).template_name for t in ("sst5", "rte", "boolq")] == ["review", "qa", "mezo"]
    for task, named in TEMPLATES.items():
        assert templates(task)[0] == load_task(task).template_name and set(templates(task)) == {"mezo", *named}
        for name in named:
            t = load_task(task, name)
            assert len(t.label_words) == len(BUILTIN[task].label_words) and set(t.fields) == set(BUILTIN[task].fields)
    with pytest.raises(OrtzoError, match="task sst2 has no template 'poem'; its templates: review-demos, mezo, review"):
        load_task("sst2", "poem")


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="needs ../shared/data")
def test_the_demonstrations_are_training_sentences_with_their_labels():
    demos = load_task("sst2", "review-demos")
    row = {"sentence": " a charming journey . "}
    prompt = demos.prompt(row)
    assert prompt.endswith("\n\n" + load_task("sst2", "review").prompt(row))  # the review prompt, after the demos
    shown = re.findall(r"Review: (.*)\nSentiment: (negative|positive)\n\n", prompt)
    assert len(shown) == 2 and [word for _, word in shown] == ["negative", "positive"]
    rows = {}
    for split in ("train", "validation"):
        for line in (SHARED_DATA / "sst2" / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows.setdefault(r["sentence"].strip(), set()).add((split, r["label"]))
    # from the training split (never validation), each under its own gold label
    assert [rows[s] for s, _ in shown] == [{("train", 0)}, {("train", 1)}]


def test_a_run_records_and_reuses_its_template(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    from ortzo.cli import main
    from ortzo.tasks import task

    # the tiny tokenizer knows few words: a template whose label words it can tell apart
    monkeypatch.setitem(task.TEMPLATES, "sst2", {"plain": ("Review: {sentence}\nSentiment:", (" bad", " good"))})
    out = tmp_path / "run"
    assert main(["finetune", str(tiny_model), "--task", "sst2", "--template", "plain", "--data", str(tiny_data),
                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--train-examples", "8",
                 "--eval-examples", "8"]) == 0
    assert "recipe: prompt plain 'Review: {sentence}\\nSentiment:' -> ' bad' / ' good'" in capsys.readouterr().err
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["template"] == "plain" and recorded["recorded"]["task"]["label_words"] == [" bad", " good"]
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--template", "mezo"]) == 0  # the same weights under MeZO's prompt
    other = json.loads(capsys.readouterr().out)
    assert ran["examples"] == other["examples"] == 8 and ran["loss"] != other["loss"]


def test_eval_subset_on_the_schedule_and_the_whole_set_at_both_ends(tiny_model, tiny_data, tmp_path):
    from ortzo.cli import main
    from ortzo.tasks.data import subset

    out = tmp_path / "run"
    assert main(["finetune", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--out", str(out),
                 "--steps", "6", "--eval-every", "2", "--eval-subset", "10", "--batch-size", "4",
                 "--train-examples", "16"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval_examples"]) for r in rows] == [(0, 32), (2, 10), (4, 10), (6, 32)]
    # the subset's accuracy is that of the same 10 rows `ortzo eval` scores at that step
    val = [json.loads(line) for line in (tiny_data / "validation.jsonl").read_text().splitlines()]
    picked = subset(val, 10, 0)
    assert picked == subset(val, 10, 0) and len({r["idx"] for r in picked}) == 10 and picked != val[:10]
    spec = tmp_path / "picked.jsonl"
    spec.write_text("".join(json.dumps(r) + "\n" for r in picked))
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["eval", str(out), "--step", "4", "--eval-split", str(spec)]) == 0
    assert json.loads(buf.getvalue())["accuracy"] == rows[2]["eval_accuracy"]


def test_multi_token_label_words_score_their_whole_log_likelihood(tiny_hf, tiny_model, tmp_path, tiny_data):
    """Each word's score is the sum of its tokens' log-probs after the prompt, checked against
    PyTorch's log-softmax of the full sequence prompt + word."""
    import torch
    from transformers import AutoModelForCausalLM

    import ortzo

    spec = tmp_path / "words.toml"
    spec.write_text(f'template = "Review: {{sentence}}\\nSentiment:"\nlabel_words = [" awful acting", " great", '
                    f'" great story"]\ndata = "{tiny_data}"\n')
    model = ortzo.open(tiny_model)
    clf = model.classifier(str(spec))
    tok = model.tokenizer
    words = [tok.encode_plain(w) for w in (" awful acting", " great", " great story")]
    assert max(map(len, words)) > 1 and words[2][:len(words[1])] == words[1]  # one word starts another
    rows = [{"sentence": s, "label": i % 3} for i, s in enumerate(["the plot", "a dull and boring movie", "it"])]
    batch = clf.batch(rows)
    got = batch.candidate_scores(model.run(batch.feeds)["scores"])

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    want = np.zeros((len(rows), len(words)))
    for i, r in enumerate(rows):
        prompt = tok.encode(f"Review: {r['sentence']}\nSentiment:")
        for j, w in enumerate(words):
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([prompt + w])).logits[0].double(), -1).numpy()
            want[i, j] = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(w))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert clf.predict(rows).tolist() == want.argmax(axis=1).tolist()
    s = want - want.max(1, keepdims=True)
    ce = -(s - np.log(np.exp(s).sum(1, keepdims=True)))[np.arange(3), [0, 1, 2]].mean()
    assert clf.loss(model.run(batch.feeds), batch) == pytest.approx(ce, abs=1e-4)


def test_label_words_with_the_same_tokens_are_refused(tiny_model, tmp_path, tiny_data):
    spec = tmp_path / "same.toml"
    spec.write_text(f'template = "{{sentence}}"\nlabel_words = [" good", " good"]\ndata = "{tiny_data}"\n')
    with pytest.raises(OrtzoError, match="encode to the same tokens"):
        Encoder(load_task(str(spec)), _tokenizer(tiny_model))


def test_eval_calibrate_subtracts_the_mean_label_log_probs_of_training_rows(tiny_model, tiny_data, capsys):
    import ortzo
    from ortzo.cli import main

    assert main(["eval", str(tiny_model), "--task", "sst2", "--template", "mezo", "--data", str(tiny_data),
                 "--calibrate", "64"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = ortzo.open(tiny_model)
    clf = model.classifier("sst2", template="mezo")

    def log_probs(split):
        rows = [json.loads(line) for line in (tiny_data / f"{split}.jsonl").read_text().splitlines()]
        batch = clf.batch(rows)
        s = batch.candidate_scores(model.run(batch.feeds)["scores"]).astype(np.float64)
        return s - np.logaddexp.reduce(s, axis=1, keepdims=True), batch.labels

    val, labels = log_probs("validation")
    train, _ = log_probs("train")  # all 64 rows: their mean does not depend on the sample's order
    assert got["accuracy"] == pytest.approx((val.argmax(1) == labels).mean())
    assert got["calibrated_accuracy"] == pytest.approx(((val - train.mean(0)).argmax(1) == labels).mean())
    assert main(["eval", str(tiny_model), "--task", "sst2", "--data", str(tiny_data), "--calibrate", "65"]) == 2
    assert "--calibrate 65: the training sample has 64 rows" in capsys.readouterr().err
