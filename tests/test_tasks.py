"""Prompts, label words, padding and truncation, and reproducible splits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ortzo.batches import Encoder
from ortzo.data import load_split, make_splits
from ortzo.errors import OrtzoError
from ortzo.manifest import Manifest
from ortzo.tasks import BUILTIN, load_task
from ortzo.tokenizer import Tokenizer

from conftest import SHARED_DATA


def _tokenizer(folder):
    return Tokenizer(folder, Manifest.load(folder).tokenizer)


def test_sst2_prompt_is_mezos():
    t = BUILTIN["sst2"]
    assert t.prompt({"sentence": "a charming journey . ", "label": 1}) == "a charming journey . It was"
    assert t.label_words == (" terrible", " great")


def test_batch_left_pads_and_scores_the_last_position(tiny_model):
    enc = Encoder(BUILTIN["sst2"], _tokenizer(tiny_model))
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
    assert len(load_split(task, None, "train")) == 64


@pytest.mark.parametrize("text,error", [
    ('template = "{x}"\nlabel_words = [" a"]', "two label_words"),
    ('label_words = [" a", " b"]', "template"),
    ('template = "{x}"\nlabel_words = [" a", " b"]\ntruncate_field = "y"', "truncate_field"),
    ('template = "{x"\nlabel_words = [" a", " b"]', "bad task spec"),
])
def test_bad_task_spec(tmp_path, text, error):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    with pytest.raises(OrtzoError, match=error):
        load_task(str(spec))


def test_wrong_data_schema_names_file_line_and_field(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "validation.jsonl").write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(OrtzoError, match=r"validation.jsonl:1: missing field 'sentence'"):
        load_split(BUILTIN["sst2"], str(folder), "validation")
    (folder / "validation.jsonl").write_text(json.dumps({"sentence": "x", "label": 7}) + "\n")
    with pytest.raises(OrtzoError, match="label 7"):
        load_split(BUILTIN["sst2"], str(folder), "validation")


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
def test_boolq_validation_only_is_split_deterministically():
    s = make_splits(BUILTIN["boolq"], str(SHARED_DATA / "boolq"), train_examples=None, eval_examples=500)
    assert s.note and "no train split" in s.note
    assert len(s.train) + len(s.eval) == 3270 and len(s.eval) == 500
    assert not {r["idx"] for r in s.train} & {r["idx"] for r in s.eval}
    again = make_splits(BUILTIN["boolq"], str(SHARED_DATA / "boolq"), train_examples=None, eval_examples=500, seed=9)
    assert [r["idx"] for r in again.eval] == [r["idx"] for r in s.eval]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("task", sorted(BUILTIN))
def test_builtin_tasks_read_the_shared_data(task):
    rows = load_split(BUILTIN[task], str(SHARED_DATA / task), "validation")
    assert rows and BUILTIN[task].prompt(rows[0])
