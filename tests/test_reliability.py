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
