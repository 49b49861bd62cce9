"""Bad input is refused before anything is written: a one-line error naming what is wrong, nothing left behind."""

import pytest
import torch

from taskvec.cli import main
from taskvec.modeling import ModelError, load_backbone


def test_bad_scope_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--scope", "zzz", "--tasks", "trec", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown scope 'zzz'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["finetune", "--scope", "re:(", "--tasks", "trec", "--out", str(out)]) == 2
    assert "not a regular expression" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", "--model", "nope", "--tasks", "trec", "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["report", "validate", "ntk", "vectors"])
def test_commands_refuse_a_directory_that_is_not_a_run(tmp_path, capsys, cmd):
    d = tmp_path / "notarun"
    d.mkdir()
    assert main([cmd, str(d)]) == 2
    err = capsys.readouterr().err
    assert "is not a taskvec run directory (no run.json)" in err and "Traceback" not in err
    assert list(d.iterdir()) == []  # nothing created (no empty report/)


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32))
    (tmp_path / "pkl").mkdir()
    model.config.save_pretrained(tmp_path / "pkl")  # a checkpoint as older tools wrote it: config + pickle
    torch.save(model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\).*safe_serialization=True"):
        load_backbone(tmp_path / "pkl")
    loaded = load_backbone(tmp_path / "pkl", allow_pickle=True)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "pkl" / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        load_backbone(tmp_path / "empty")


def test_cli_allow_pickle_on_every_command_that_loads_a_model(tiny_bert, tmp_path, capsys, monkeypatch):
    """A base model directory holding only pytorch_model.bin: each command that loads it is refused with the
    conversion and the flag named, leaving nothing behind; with --allow-pickle it loads, every pickle read
    with torch.load(weights_only=True), and the tensors are the safetensors original's."""
    import shutil

    import yaml
    from conftest import toy_task
    from safetensors.torch import load_file

    pkl = tmp_path / "pkl"
    shutil.copytree(tiny_bert, pkl)
    torch.save(load_file(pkl / "model.safetensors"), pkl / "pytorch_model.bin")
    (pkl / "model.safetensors").unlink()
    files = []
    for name, seed in (("toy", 0), ("other", 1)):
        t = toy_task(name, n=60, seed=seed)
        files.append(tmp_path / f"{name}.csv")
        files[-1].write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)

    def refused(argv, *expected):
        capsys.readouterr()
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        for e in (f"{pkl}: only pickle weights (", "safe_serialization=True", "--allow-pickle", *expected):
            assert e in lines[0], (e, lines[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind

    def ok(argv):
        capsys.readouterr()
        assert main([str(a) for a in argv] + ["--allow-pickle"]) == 0, capsys.readouterr().err

    run = tmp_path / "run"
    ft = ["finetune", "--model", pkl, "--tasks", *files, "--out", run, "--device", "cpu", "--max-steps", "3",
          "--eval-every", "3", "--lr", "0.01", "--test-size", "10", "--val-size", "6", "--early-stopping", "none"]
    refused(ft, "pytorch_model.bin")
    assert not loads
    ok(ft)
    assert loads and all(w is True for w in loads)  # every pickle read: weights_only=True
    assert (run / "finetune" / "toy" / "model" / "model.safetensors").is_file()  # taskvec writes safetensors
    refused(["vectors", run])
    ok(["vectors", run])
    from taskvec.task_vector import TaskVector

    ref = TaskVector.from_models(tiny_bert, run / "finetune" / "other", scope="qkv")  # the base as safetensors
    got = TaskVector.load(run / "vectors" / "other.safetensors")
    assert sorted(got.deltas) == sorted(ref.deltas) and got.norm() > 0
    assert all(torch.equal(got.deltas[k], ref.deltas[k]) for k in ref.deltas)
    refused(["ntk", run, "--n", "4", "--no-cross"])
    refused(["validate", run, "--n-eval", "6", "--n-kernel", "4", "--rank", "1"])
    ok(["ntk", run, "--n", "4", "--no-cross"])
    assert (run / "ntk" / "toy.safetensors").is_file()
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": str(pkl), "parameters": {"lambda": 1.0},
                                   "models": [{"model": str(pkl)}, {"model": str(tiny_bert)}]}))
    refused(["merge", cfg, tmp_path / "merged", "--no-progress"])
    n = len(loads)
    ok(["merge", cfg, tmp_path / "merged", "--no-progress"])
    assert len(loads) > n and all(w is True for w in loads)
    from taskvec.merge.checkpoint import Checkpoint

    merged, base = Checkpoint(tmp_path / "merged"), load_file(tiny_bert / "model.safetensors")
    assert sorted(merged.info) == sorted(base)
    assert all(torch.equal(merged.get(k), base[k]) for k in base)  # the pickle base equals the other input: τ = 0


def test_a_split_too_small_for_every_class_names_the_setting(tiny_bert, tmp_path, capsys):
    from conftest import toy_task

    t = toy_task("toy", n=60)
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
    for flag, what in (("--val-size", "validation"), ("--test-size", "test")):
        out = tmp_path / "run"
        argv = ["finetune", "--model", str(tiny_bert), "--tasks", str(data), "--out", str(out), flag, "0"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert (f"task 'toy': a {what} split of 1 example cannot hold each of its 2 classes; "
                f"{flag[2:].replace('-', '_')} must be at least 2") in err, err
        assert not out.exists()
