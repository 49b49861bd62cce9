import json

import pytest
from conftest import toy_task

from taskvec.errors import DataError
from taskvec.tasks import Splits, Task, check_splits, load_task, load_task_file, make_splits


def test_splits_are_deterministic_stratified_and_disjoint():
    t = toy_task(n=200)
    a, b = make_splits(t, seed=3, test_size=40, val_size=20), make_splits(t, seed=3, test_size=40, val_size=20)
    assert a.to_json() == b.to_json()
    c = make_splits(t, seed=4, test_size=40, val_size=20)
    assert c.test != a.test
    assert not set(a.train) & set(a.test) and not set(a.val) & set(a.test) and not set(a.train) & set(a.val)
    assert len(a.test) == 40 and len(a.val) == 20 and len(a.train) == 140
    assert sum(t.labels[i] for i in a.test) == 20  # stratified 50/50
    assert Splits.from_json(json.loads(json.dumps(a.to_json()))).train == a.train


def test_max_train_subsamples():
    s = make_splits(toy_task(n=200), test_size=40, val_size=20, max_train=50)
    assert len(s.train) == 50


def test_user_csv_and_jsonl(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("sentence,y\nhello there,pos\nawful day,neg\nnice,pos\n")
    t = load_task_file(p, text_column="sentence", label_column="y")
    assert t.label_names == ["neg", "pos"] and t.labels == [1, 0, 1] and t.name == "t"
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a", "b": "x", "label": 0}\n{"text": "b", "b": "y", "label": 1}\n')
    t = load_task(str(j), text_pair_column="b")
    assert t.texts_b == ["x", "y"] and t.label_names == ["0", "1"]


def test_from_lists_and_dataset_like():
    t = Task.from_lists("x", ["a", "b", "c"], ["yes", "no", "yes"])
    assert t.label_names == ["no", "yes"] and t.labels == [1, 0, 1]
    t = Task.from_dataset({"text": ["a", "b"], "label": [0, 1]}, name="d")
    assert t.num_labels == 2


def test_errors(tmp_path):
    with pytest.raises(DataError, match="bundled tasks: rotten_tomatoes"):
        load_task("no_such_task")
    p = tmp_path / "t.csv"
    p.write_text("text,label\na,1\n")
    with pytest.raises(DataError, match="column 'sentence' not found; available columns: \\['text', 'label'\\]"):
        load_task_file(p, text_column="sentence")
    with pytest.raises(DataError, match="single class"):
        load_task_file(p)
    with pytest.raises(DataError, match="no examples"):
        Task("e", [], [], ["a", "b"])
    with pytest.raises(DataError, match="unknown label 'maybe'"):
        Task.from_lists("x", ["a", "b"], ["yes", "maybe"], label_names=["no", "yes"])
    t = Task("t", ["a", "b", "c", "d", "e", "f"], [0, 0, 0, 1, 1, 2], ["x", "y", "z"])
    with pytest.raises(DataError, match="fewer than 3 examples"):
        make_splits(t)
    t = Task("t", list("abcdef"), [0, 0, 1, 1, 2, 2], ["x", "y", "z"])
    with pytest.raises(DataError, match=r"labels \['z'\] appear in the test split but not in train"):
        check_splits(t, Splits([0, 2], [1], [4]))


@pytest.mark.parametrize("name,classes", [("rotten_tomatoes", 2), ("trec", 6), ("sms_spam", 2),
                                          ("tweet_sentiment", 2), ("bbc_news", 5), ("subjectivity", 2)])
def test_bundled_tasks_load(name, classes):
    t = load_task(name)
    assert t.num_labels == classes and len(t) > 1000
    assert len(set(t.texts)) == len(t)  # de-duplicated
    s = make_splits(t, max_train=2000)
    assert len(s.train) <= 2000 and len(s.test) >= 400
