"""validate_lm_run on a tiny LM run: measured changes equal lm_metrics' figures of the merged model,
predictions scale as the Taylor terms do, the backbone is restored, non-LM runs are refused."""

import pytest
import torch
from test_lm_finetune import CFG, _tasks, tiny_lm  # noqa: F401 (fixture)

from taskvec import lm_metrics as lm
from taskvec.errors import TaskvecError
from taskvec.finetune import FinetuneConfig, extract_vectors, finetune
from taskvec.lm_validate import applied, validate_lm_run
from taskvec.merge.memory import MergeSpec
from taskvec.runs import open_run


@pytest.fixture(scope="module")
def lm_run(tiny_lm, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lmrun") / "run"
    finetune(tiny_lm, list(_tasks()), out, FinetuneConfig(**{**CFG, "max_steps": 4, "eval_every": 2}),
             progress=False)
    extract_vectors(out)
    return out


def test_validate_lm_run_measures_what_lm_metrics_measure(lm_run):
    res = validate_lm_run(lm_run, merges=[MergeSpec("ties", "ties", {"density": 0.5})], lambdas=[0.5, 1.0],
                          n_eval=8, n_holdout=8, progress=False)
    rows = {(r["merge"], r["task"]): r for r in res["rows"]}
    assert len(rows) == 3 * 2 and res["summary"]["n_predictions"] == 6
    run = open_run(lm_run, require="vectors")
    tok = run.tokenizer()
    vecs = run.vectors()
    for s in run.names:
        a, b = rows[("task_arithmetic λ=0.5", s)], rows[("task_arithmetic λ=1", s)]
        # the log-likelihood's first-order term is linear in λ; the NLL of the linearised logits is not, and
        # it is never negative
        assert b["predicted_loglik_1st"] == pytest.approx(2 * a["predicted_loglik_1st"], rel=1e-9)
        assert b["predicted_logits_1st"] != pytest.approx(2 * a["predicted_logits_1st"], rel=1e-3)
        assert b["base_nll"] + b["predicted_logits"] > 0 and b["predicted_taylor"] == b["predicted_loglik"]
        assert b["predicted"] == (b["probe_predicted"] if b["predictor"] == "probe" else b["predicted_taylor"])
        # the measured change at λ = 1 is lm_metrics' mean NLL of θ0 + Στ minus θ0's, on the same examples
        task = run.task(s).task
        idx = run.sample(s, "test", 8)
        model = run.base_task_model(s)

        def nll(m):
            if task.objective == "lm":
                return lm.text_loss(m, tok, [task.texts[i] for i in idx], max_length=128).mean_nll
            return lm.completion_loss(m, tok, [task.prompt.format(text=task.texts[i]) for i in idx],
                                      [" " + task.label_words[task.labels[i]] for i in idx]).mean_nll

        def acc(m):  # multiple-choice accuracy over the label words, lm-evaluation-harness style
            return lm.multiple_choice(m, tok, [task.prompt.format(text=task.texts[i]) for i in idx],
                                      [list(task.label_words)] * len(idx), [task.labels[i] for i in idx])

        before = nll(model)
        sum_tau = {k: sum(v.deltas[k] for v in vecs.values()) for k in vecs[s].deltas}
        with applied(model.backbone, sum_tau):
            after = nll(model)
            if task.objective == "choice":
                mc = acc(model)
                assert b["acc_measured"] == pytest.approx(100 * mc.acc) and b["acc_norm_measured"] == pytest.approx(
                    100 * mc.acc_norm)
        if task.objective == "choice":
            assert b["acc_base"] == pytest.approx(100 * acc(model).acc)
        else:
            assert "acc_measured" not in b
        assert b["measured"] == pytest.approx(after - before, rel=1e-4, abs=1e-6)
        assert b["base_nll"] == pytest.approx(before, rel=1e-5)
    assert set(res["summary"]["eval"]) >= {"spearman", "mae_trusted", "calibration", "spearman_loglik"}
    assert res["summary"]["choice"]["n"] == 3 and "spearman" in res["summary"]["choice"]["heldout"]
    co = res["coefficients"]
    assert co["lambda_star"] > 0 and len(res["interference"]["measured"]) == 2
    if co["lambda_converges_up_to"] is not None:  # λ* searched where every task's series converges
        assert co["lambda_star"] <= co["lambda_converges_up_to"]
    else:
        assert co["lambda_star"] == 0.05


def test_applied_restores_the_backbone_bit_for_bit():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bb = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    name = "encoder.layer.0.attention.self.query.weight"
    with applied(bb, {name: torch.full((8, 8), 0.1)}):
        assert not torch.equal(dict(bb.named_parameters())[name], before[name])
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())


def test_a_classification_run_is_refused(tiny_run):
    with pytest.raises(TaskvecError, match="not an LM head: validate_lm_run needs LM tasks"):
        validate_lm_run(tiny_run, n_eval=4, progress=False, out=None)


def test_pipeline_validate_stage_of_an_lm_run(tiny_lm, tmp_path):  # noqa: F811
    import json

    from conftest import toy_task

    from taskvec.pipeline import load_config, run_pipeline

    paths = []
    for name, seed in (("alpha", 0), ("beta", 1)):
        t = toy_task(name, n=80, seed=seed)
        p = tmp_path / f"{name}.csv"
        p.write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
        paths.append(str(p))
    cfg = {"model": str(tiny_lm), "tasks": paths, "stages": ["finetune", "vectors", "validate"],
           "finetune": {**CFG, "objective": "lm", "max_steps": 2, "eval_every": 2},
           "merge": {"methods": [{"method": "ties", "density": 0.5}]},
           "validate": {"n_eval": 6, "n_holdout": 6, "lambdas": [0.5, 1.0], "max_uncertainty": 0.02,
                        "progress": False}}
    res = run_pipeline(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "validation" / "lm_results.json").read_text())
    assert res["validate"]["summary"] == saved["summary"]
    assert {r["merge"] for r in saved["rows"]} == {"task_arithmetic λ=0.5", "task_arithmetic λ=1", "ties density=0.5"}
    assert load_config("lm")["model"] == "smollm2"  # the packaged config


def test_a_probe_of_every_evaluation_example_predicts_the_measured_change(lm_run):
    res = validate_lm_run(lm_run, lambdas=[1.0], n_eval=8, n_holdout=4, n_probe=8, max_uncertainty=1e-9,
                          out=lm_run / "probe_all.json", progress=False)
    rows = res["rows"]
    assert all(r["predictor"] in ("probe", "probe_check") for r in rows)
    for r in rows:
        if r["predictor"] == "probe":
            assert r["predicted"] == pytest.approx(r["measured"], abs=1e-9) and r["uncertainty"] == 0
    assert res["summary"]["n_probed"] + res["summary"]["n_probe_checked"] == len(rows)


def test_the_report_of_an_lm_run_shows_its_validation_in_nats(lm_run):
    from taskvec.report import write_report

    res = validate_lm_run(lm_run, lambdas=[1.0], n_eval=6, n_holdout=4, n_probe=2, overwrite=True, progress=False)
    page = write_report(lm_run, overwrite=True)
    text = page.read_text()
    assert "Merges of causal-LM tasks: predicted vs measured mean NLL" in text
    assert (page.parent / "lm_predicted_vs_measured.png").is_file()
    assert "Multiple choice" in text and f"{res['rows'][0]['measured']:+.3f}" in text


def test_taskvec_validate_of_an_lm_run_predicts_in_nats(lm_run, tmp_path, capsys):
    import json

    from taskvec.cli import main

    out = tmp_path / "lm.json"
    assert main(["validate", str(lm_run), "--n-eval", "4", "--n-probe", "0", "--predictor", "logits",
                 "--max-memory", "1GB", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["predictor"] == "logits" and res["n_eval"] == 4 and res["summary"]["max_uncertainty"] == 0.05
    assert all(r["predictor"] == "taylor" for r in res["rows"])  # no probe asked for
    assert "Spearman predicted vs measured mean-NLL change" in capsys.readouterr().out
    capsys.readouterr()
    best = tmp_path / "best"
    assert main(["validate", str(lm_run), "--n-eval", "4", "--write-best", str(best), "--out", str(out),
                 "--overwrite"]) == 0
    assert "wrote the recommended merge" in capsys.readouterr().out
    res = json.loads(out.read_text())
    from taskvec.lm_best import recommended

    cand = recommended(res)
    card = (best / "README.md").read_text()
    assert "## Validation" in card and cand["name"] in card and f"{cand['measured']:+.3f}" in card
    # the directory holds the recommended merge: θ0 + its Δ, loadable with plain transformers
    from transformers import AutoModel

    run = open_run(lm_run, require="vectors")
    merged = dict(AutoModel.from_pretrained(best).named_parameters())
    base = dict(run.backbone("cpu").named_parameters())
    vecs = run.vectors()
    assert cand["method"] == "task_arithmetic"  # the CLI run measures task arithmetic at each λ and at λ*
    lam = cand["params"]["lambda"]
    k = next(iter(vecs[run.names[0]].deltas))
    want = base[k] + lam * sum(v.deltas[k] for v in vecs.values())
    assert torch.allclose(merged[k], want, atol=1e-6)
