"""A decoder run (tiny random Llama, label-word heads) through every stage of `taskvec run`."""

import json

import torch
from conftest import toy_task

from taskvec.pipeline import run_pipeline
from taskvec.runs import Run


def test_decoder_label_word_run_through_every_stage(tiny_dirs, tmp_path):
    paths = []
    for name, seed in (("alpha", 0), ("beta", 1)):
        t = toy_task(name, n=80, seed=seed)
        p = tmp_path / f"{name}.csv"
        p.write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
        paths.append(str(p))
    cfg = {"model": str(tiny_dirs["llama"]), "tasks": paths,
           "ntk": {"n": 6, "num_boot": 2, "cross": False},
           "finetune": {"max_steps": 4, "eval_every": 2, "lr": 3e-3, "test_size": 16, "val_size": 8,
                        "device": "cpu", "attn_implementation": "eager"},
           "merge": {"methods": [{"method": "task_arithmetic", "lambda": 0.5}]},
           "validate": {"n_eval": 12, "n_kernel": 6, "rank": 2, "lambdas": [0.5, 1.0], "progress": False}}
    out = tmp_path / "run"
    res = run_pipeline(cfg, out)
    assert set(res) >= {"finetune", "vectors", "ntk", "merge", "validate", "report"}
    run = Run.open(out, require="vectors")
    for t in run.names:
        rt = run.task(t)
        assert rt.head.kind == "label_words" and rt.prompt and "{text}" in rt.prompt
    # the ntk stage read the task through its prompt, on the examples every stage samples
    ntk = run.ntk_results()
    for t in run.names:
        meta = ntk["spectra"][t]["meta"]
        assert meta["prompt"] == run.task(t).prompt
        assert meta["examples"] == run.sample(t, "train", 6)
    # its kernel inputs are the prompted texts: the same kernel as the one computed here from them
    from taskvec.ntk import NTKResult, as_batch, empirical_ntk

    t = run.names[0]
    K = empirical_ntk(run.base_task_model(t), as_batch(list(run.kernel_batches(t, 6))), params="qkv",
                      output="logits", kernel="full").kernel
    saved = NTKResult.load(run.stage_dir("ntk") / f"{t}.safetensors").kernel
    assert torch.allclose(saved.double(), K.double(), rtol=1e-6, atol=1e-9)
    val = run.validation_results()
    assert val["summary"]["n_predictions"] == 2 * 4  # 1 merge + 2 NTK-aware + TA at λ*
    assert (out / "report" / "report.html").is_file()
    assert json.loads((out / "results.json").read_text())["ntk"]["summary"].keys() == set(run.names)
