"""The run object: one reader of RUN/, one seeded sampler, one way to build batches; clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from taskvec.runs import Run, RunError, open_run


def test_open_reads_the_run(tiny_run):
    run = Run.open(tiny_run, require="vectors")
    meta = json.loads((tiny_run / "run.json").read_text())
    assert run.names == meta["tasks"] == ["a", "b", "c"]
    assert run.base_model == meta["base_model"] and run.scope == meta["scope"]
    rt = run.task("a")
    assert rt.finished and rt.head.kind == "linear" and rt.prompt is None
    assert rt.max_length == meta["config"]["max_length"]
    assert len(rt.task) == 150 and rt.task.name == "a"
    assert set(run.vectors()) == {"a", "b", "c"}
    assert "tasks=['a', 'b', 'c']" in repr(run)
    assert open_run(run) is run


def test_sample_is_seeded_nested_and_inside_its_split(tiny_run):
    run = Run.open(tiny_run)
    sp = run.task("a").splits
    for split in ("train", "val", "test"):
        small, big = run.sample("a", split, 5, seed=3), run.sample("a", split, 12, seed=3)
        assert small == sorted(small) and set(small) <= set(big) <= set(getattr(sp, split))
        assert run.sample("a", split, 12, seed=3) == big  # deterministic
    assert run.sample("a", "test", None) == sorted(sp.test)
    assert run.sample("a", "train", 20, seed=0) != run.sample("a", "train", 20, seed=1)
    # the draw order is fixed (test, then train, then val from one generator)
    rng = np.random.default_rng(0)
    test = sorted(rng.permutation(sp.test)[:7].tolist())
    train = sorted(rng.permutation(sp.train)[:9].tolist())
    assert run.sample("a", "test", 7) == test and run.sample("a", "train", 9) == train
    with pytest.raises(RunError, match="split 'dev'"):
        run.sample("a", "dev", 3)


def test_holdout_is_the_rest_of_the_test_permutation(tiny_run):
    run = Run.open(tiny_run)
    test = run.task("a").splits.test
    ev, rest = run.sample("a", "test", 10), run.holdout("a", 10)
    assert not set(ev) & set(rest) and sorted(ev + rest) == sorted(test)
    assert run.holdout("a", 10, 5) == sorted(set(run.holdout("a", 10, 5)) & set(rest)) and len(run.holdout("a", 10, 5)) == 5
    assert run.holdout("a", len(test)) == []


def test_batches_follow_the_sample_and_the_run_max_length(tiny_run):
    run = Run.open(tiny_run)
    ev = run.eval_batches("b", 10)
    assert ev.indices == run.sample("b", "test", 10)
    kb = run.kernel_batches("b", 6, max_length=4)
    assert all(b["input_ids"].shape[1] <= 4 for b in kb)
    labels = torch.cat([b["labels"] for b in kb])
    assert labels.tolist() == [run.task("b").task.labels[i] for i in kb.indices]


def test_base_task_model_is_theta0_with_the_task_head(tiny_run):
    run = Run.open(tiny_run)
    m = run.base_task_model("a")
    bb = run.backbone()
    for (k, v), (k2, v2) in zip(m.backbone.state_dict().items(), bb.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    ft = run.finetuned_model("a")
    assert any(not torch.equal(v, ft.backbone.state_dict()[k]) for k, v in bb.state_dict().items())


def test_errors_name_what_is_missing(tiny_run, tmp_path):
    with pytest.raises(RunError, match="is not a directory"):
        Run.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"not a taskvec run directory \(no run.json\)"):
        Run.open(tmp_path / "empty")
    part = tmp_path / "partial"
    shutil.copytree(tiny_run, part)
    (part / "vectors" / "b.safetensors").unlink()
    Run.open(part)  # fine-tuned is enough for require="finetune"
    with pytest.raises(RunError, match=r"no task vector for 'b' .*b.safetensors is missing.*taskvec vectors"):
        Run.open(part, require="vectors")
    (part / "finetune" / "c" / "log.json").unlink()
    with pytest.raises(RunError, match=r"task 'c' .* not finished fine-tuning .*log.json is missing"):
        Run.open(part)
    assert Run.open(part, require="run").names == ["a", "b", "c"]  # the report can still read it
    (part / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="run.json is not valid JSON"):
        Run.open(part)
    with pytest.raises(RunError, match="task 'zz' is not in run"):
        Run.open(tiny_run).task("zz")


def test_decoder_label_word_tasks_are_read_through_their_prompt(tiny_dirs, tmp_path):
    from conftest import toy_task

    from taskvec.finetune import FinetuneConfig, finetune

    t = toy_task("lw", n=60)
    t.label_words = ["bad", "good"]
    cfg = FinetuneConfig(max_steps=2, eval_every=2, lr=1e-3, test_size=12, val_size=8, device="cpu",
                         attn_implementation="eager")
    finetune(tiny_dirs["llama"], [t], tmp_path / "r", cfg, progress=False)
    run = Run.open(tmp_path / "r")
    rt = run.task("lw")
    assert rt.head.kind == "label_words" and rt.prompt == t.prompt and "{text}" in rt.prompt
    b = next(iter(run.batches("lw", run.sample("lw", "train", 1))))
    text = run.tokenizer().decode(b["input_ids"][0], skip_special_tokens=True).lower()
    words = [w.strip(":").lower() for w in t.prompt.replace("{text}", "").split()]
    assert words and all(w in text for w in words)
