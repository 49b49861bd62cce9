import json

import pytest
from conftest import toy_task

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.pipeline import load_config, run_pipeline


def test_default_config_is_valid():
    cfg = load_config("default")
    assert cfg["model"] == "minilm" and len(cfg["tasks"]) == 4 and cfg["stages"][0] == "finetune"


def test_bad_configs_list_valid_names(tmp_path):
    with pytest.raises(TaskvecError, match="unknown stages \\['bake'\\]; valid stages"):
        load_config({"stages": ["finetune", "bake"]})
    with pytest.raises(TaskvecError, match="unknown config keys"):
        load_config({"modle": "x"})
    with pytest.raises(TaskvecError, match="neither a file nor a packaged config"):
        load_config("nope")


def test_pipeline_end_to_end_on_a_tiny_model(tiny_bert, tmp_path):
    """finetune -> vectors -> merge -> validate -> report on a tiny random BERT and tiny CSV tasks."""
    paths = []
    for name, seed in (("alpha", 0), ("beta", 1)):
        t = toy_task(name, n=120, seed=seed)
        p = tmp_path / f"{name}.csv"
        p.write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
        paths.append(str(p))
    cfg = {"model": str(tiny_bert), "tasks": paths,
           "stages": ["finetune", "vectors", "ntk", "merge", "validate", "report"],
           "ntk": {"n": 8, "num_boot": 4},
           "finetune": {"max_steps": 12, "eval_every": 6, "lr": 3e-3, "test_size": 24, "val_size": 12,
                        "device": "cpu"},
           "merge": {"methods": [{"method": "task_arithmetic", "lambda": 0.5}, {"method": "ties", "density": 0.5}]},
           "validate": {"n_eval": 24, "n_kernel": 8, "rank": 2, "lambdas": [0.5, 1.0], "progress": False}}
    out = tmp_path / "run"
    res = run_pipeline(cfg, out)
    assert set(res["finetune"]["tasks"]) == {"alpha", "beta"}
    assert (out / "merges").is_dir() and len(list((out / "merges").iterdir())) == 2
    assert (out / "ntk" / "alpha.spectrum.json").exists() and set(res["ntk"]) >= {"alpha", "beta"}
    assert (out / "report" / "report.html").exists() and (out / "report" / "interference.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["validation"]["summary"]["n_predictions"] == 2 * 5  # 2 merges + 2 ntk-aware + TA at λ*
    stages = json.loads((out / "stages.json").read_text())
    # a second run reuses every stage; changing a stage's config recomputes it and what follows
    again = run_pipeline(cfg, out)
    assert again["finetune"]["tasks"]["alpha"]["wall_time_s"] == res["finetune"]["tasks"]["alpha"]["wall_time_s"]
    cfg["merge"]["methods"][0]["lambda"] = 0.7
    run_pipeline(cfg, out, stages=["merge"])
    new = json.loads((out / "stages.json").read_text())
    assert new["merge"] != stages["merge"] and new["finetune"] == stages["finetune"]
    # --overwrite of one stage recomputes it and keeps the records of the others (a later plain run reuses them)
    run_pipeline(cfg, out, stages=["report"], overwrite=True)
    kept = json.loads((out / "stages.json").read_text())
    assert kept["finetune"] == stages["finetune"] and kept["merge"] == new["merge"] and "report" in kept
    # every command that writes refuses an existing output unless --overwrite
    for cmd in (["report", str(out)], ["validate", str(out)], ["ntk", str(out)]):
        assert main(cmd) == 2, cmd
    assert main(["report", str(out), "--overwrite"]) == 0
    page = (out / "report" / "report.html").read_text()
    assert "The ntk stage" in page and "decay α [90% CI]" in page  # the ntk stage's spectra reach the report
    assert "|---|" not in page and page.count("<table>") >= 5  # summary tables as HTML, not raw markdown
    assert (out / "report" / "ntk_spectrum.png").is_file()


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["finetune", "--model", "nope", "--out", str(tmp_path / "x"), "--tasks", "trec"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "minilm" in err
    assert main(["finetune", "--tasks", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "bundled tasks: rotten_tomatoes" in capsys.readouterr().err


def test_replace_marked_section(tmp_path):
    from taskvec.io import replace_marked_section

    p = tmp_path / "R.md"
    p.write_text("a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n")
    assert replace_marked_section(p, "x", "new\n")
    assert p.read_text() == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n"
    assert not replace_marked_section(p, "y", "z")
