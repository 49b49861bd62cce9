"""Fisher merging and RegMean (taskvec/merge/data_aware.py) against slow references written from their
definitions (THEORY.md, "Merge methods"), on a tiny fine-tuned BERT run; and their bad inputs."""

import pytest
import torch
from safetensors.torch import load_file

from taskvec.merge import MergeError, merge, merge_vectors
from taskvec.merge.data_aware import (
    TaskStatistics,
    fisher_delta,
    fisher_statistics,
    gram_statistics,
    merge_run_vectors,
    merge_tensor,
    regmean_delta,
    run_statistics,
)
from taskvec.runs import open_run

# --- pure functions ---------------------------------------------------------------------------------------


def _ref_regmean(deltas, grams, weights, alpha):
    """(Σ w G̃)⁻¹ Σ w G̃ τᵀ entry by entry: G̃_ij = G_ij·(α if i ≠ j else 1); τ is (d_out, d_in)."""
    d_in = grams[0].shape[0]
    lhs = torch.zeros(d_in, d_in, dtype=torch.float64)
    rhs = torch.zeros(d_in, deltas[0].shape[0], dtype=torch.float64)
    for d, G, w in zip(deltas, grams, weights):
        Gt = torch.zeros(d_in, d_in, dtype=torch.float64)
        for i in range(d_in):
            for j in range(d_in):
                Gt[i, j] = G[i, j] * (1.0 if i == j else alpha)
        lhs += w * Gt
        rhs += w * Gt @ d.double().T
    return (torch.linalg.inv(lhs) @ rhs).T


def test_regmean_delta_equals_the_definition_and_solves_its_least_squares():
    g = torch.Generator().manual_seed(0)
    X = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x / 40 for x in X]
    deltas = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    for alpha in (0.9, 1.0, 0.0):
        got = regmean_delta(deltas, grams, w, alpha)
        torch.testing.assert_close(got, _ref_regmean(deltas, grams, w, alpha), rtol=1e-10, atol=1e-12)
    # α = 1: W* minimises Σ_t w_t ‖X_t Wᵀ − X_t W_tᵀ‖², so its gradient Σ_t w_t G_t (W* − W_t)ᵀ vanishes
    got = regmean_delta(deltas, grams, w, 1.0)
    grad = sum(wt * G @ (got - d).T for wt, G, d in zip(w, grams, deltas))
    assert float(grad.abs().max()) < 1e-10
    # the GPT-2 Conv1D layout (d_in, d_out) gives the transposed result
    conv = regmean_delta([d.T.contiguous() for d in deltas], grams, w, 0.9, layout="conv1d")
    torch.testing.assert_close(conv, regmean_delta(deltas, grams, w, 0.9).T)
    # equal Grams cancel: the weighted mean
    same = regmean_delta(deltas, [grams[0]] * 3, w, 0.9)
    torch.testing.assert_close(same, sum(wt * d for wt, d in zip(w, deltas)) / sum(w))


def test_fisher_delta_equals_the_definition_entry_by_entry():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(4, 3, generator=g) for _ in range(3)]
    fishers = [torch.rand(4, 3, generator=g) for _ in range(3)]
    fishers[1][0, 0] = 0.0
    for f in fishers:
        f[2, 2] = 0.0  # zero in every task: the weighted mean
    w = [1.0, 2.0, 0.5]
    got = fisher_delta(deltas, fishers, w, floor=1e-6)
    for i in range(4):
        for j in range(3):
            num = sum(w[t] * (float(fishers[t][i, j]) + 1e-6) * float(deltas[t][i, j]) for t in range(3))
            den = sum(w[t] * (float(fishers[t][i, j]) + 1e-6) for t in range(3))
            assert abs(float(got[i, j]) - num / den) < 1e-6
    mean = sum(wt * d[2, 2] for wt, d in zip(w, deltas)) / sum(w)
    assert abs(float(got[2, 2]) - float(mean)) < 1e-6


def test_bad_shapes_and_counts_are_refused():
    d = [torch.zeros(5, 6)] * 2
    with pytest.raises(MergeError, match="Gram of shape \\(5, 5\\) for a weight with 6 inputs"):
        regmean_delta(d, [torch.eye(5, dtype=torch.float64)] * 2, [1.0, 1.0], name="q.weight")
    with pytest.raises(MergeError, match="2 task vectors, 1 Grams"):
        regmean_delta(d, [torch.eye(6)], [1.0, 1.0])
    with pytest.raises(MergeError, match="singular"):
        regmean_delta(d, [torch.zeros(6, 6, dtype=torch.float64)] * 2, [1.0, 1.0], alpha=0.9)
    with pytest.raises(MergeError, match="a Fisher of shape"):
        fisher_delta(d, [torch.ones(6, 5)] * 2, [1.0, 1.0])
    with pytest.raises(MergeError, match="need statistics of each task.s data"):
        merge_vectors([type("V", (), {"deltas": {"w": torch.zeros(2)}})()], "fisher", {"w": torch.zeros(2)})


def test_regmean_averages_tensors_that_are_not_linear_weights():
    g = torch.Generator().manual_seed(2)
    d = [torch.randn(7, generator=g) for _ in range(2)]
    stats = TaskStatistics("regmean", {"a": {"w": torch.eye(3)}, "b": {"w": torch.eye(3)}}, {"w": "linear"})
    torch.testing.assert_close(merge_tensor(stats, "bias", d, [1.0, 3.0], {}), (d[0] + 3 * d[1]) / 4)
    with pytest.raises(MergeError, match="statistics of 2 tasks for 3 inputs"):
        merge_tensor(stats, "bias", d + d[:1], [1.0] * 3, {})


# --- statistics against per-example loops ---------------------------------------------------------------


def _ref_fisher(model, batches, keys):
    """(1/n) Σ_x Σ_c p(c|x) (∂ log p(c|x)/∂θ)², one example and one class at a time with autograd."""
    named = dict(model.named_parameters())
    params = [named["backbone." + k] for k in keys]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    n = 0
    model.eval()
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            m = b["attention_mask"][i:i + 1]
            logp = torch.log_softmax(model(b["input_ids"][i:i + 1], m, b.get("token_type_ids")[i:i + 1]
                                           if b.get("token_type_ids") is not None else None)[0], -1)
            for c in range(logp.shape[0]):
                gs = torch.autograd.grad(logp[c], params, retain_graph=True)
                for a, gr in zip(acc, gs):
                    a += float(logp[c].detach().exp()) * gr.double() ** 2
            n += 1
    return {k: a / n for k, a in zip(keys, acc)}


def _ref_grams(model, batches, layer):
    """Σ over real tokens of x xᵀ / #tokens, x = the input of layer ``layer``'s attention (its hidden state
    from ``output_hidden_states``), one token at a time."""
    G, tokens = None, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            hs = model.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                output_hidden_states=True).hidden_states[layer]
            for i in range(hs.shape[0]):
                for t in range(hs.shape[1]):
                    if b["attention_mask"][i, t]:
                        x = hs[i, t].double()[:, None]
                        G = x @ x.T if G is None else G + x @ x.T
                        tokens += 1
    return G / tokens


def test_fisher_statistics_equal_per_example_autograd(tiny_run):
    run = open_run(tiny_run)
    model = run.finetuned_model("a")
    batches = run.kernel_batches("a", 6, batch_size=4)
    keys = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.value.bias"]
    got = fisher_statistics(model, batches, keys, chunk_size=2)
    ref = _ref_fisher(model, batches, keys)
    for k in keys:
        assert float(ref[k].abs().max()) > 0
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-9 * float(ref[k].abs().max()))


def test_gram_statistics_equal_token_loops_and_skip_non_linear_tensors(tiny_run):
    run = open_run(tiny_run)
    model = run.finetuned_model("b")
    batches = run.kernel_batches("b", 5, batch_size=2)
    keys = ["encoder.layer.1.attention.self.key.weight", "encoder.layer.1.attention.self.key.bias"]
    grams, layout = gram_statistics(model, batches, keys)
    assert set(grams) == {keys[0]} and layout == {keys[0]: "linear"}  # a bias is not a linear layer's weight
    torch.testing.assert_close(grams[keys[0]], _ref_grams(model, batches, 1), rtol=1e-9, atol=1e-12)


# --- taskvec merge with run: ---------------------------------------------------------------------------


def _merged(out):
    import json

    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()) \
        if (out / "model.safetensors.index.json").is_file() else {"model.safetensors"}
    d = {}
    for f in files:
        d.update(load_file(str(out / f)))
    return d


def test_regmean_merge_of_a_run_equals_the_reference(tiny_run, tmp_path):
    run = open_run(tiny_run)
    out = tmp_path / "regmean"
    res = merge({"run": str(tiny_run), "method": "regmean", "parameters": {"n_examples": 5}}, out,
                show_progress=False)
    assert sorted(res.heads) == ["a", "b", "c"] and (out / "README.md").is_file()
    merged = _merged(out)
    base = {k: v for k, v in _merged_base(run).items()}
    vecs = {t: run.vector(t).deltas for t in run.names}
    key = "encoder.layer.1.attention.self.query.weight"
    grams = [_ref_grams(run.finetuned_model(t), run.kernel_batches(t, 5, batch_size=16), 1) for t in run.names]
    want = base[key].double() + _ref_regmean([vecs[t][key] for t in run.names], grams, [1.0] * 3, 0.9)
    name = next(n for n in merged if n.endswith(key))
    torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6)
    other = "encoder.layer.0.attention.output.dense.weight"  # outside the scope: θ0
    assert torch.equal(merged[next(n for n in merged if n.endswith(other))], base[other])
    # validation's in-memory merge is the same merge
    mem = merge_run_vectors(run, [run.vector(t) for t in run.names], "regmean",
                            {k: base[k] for k in vecs["a"]}, run.names, n_examples=5)
    torch.testing.assert_close(mem[key] + base[key], merged[next(n for n in merged if n.endswith(key))])


def _merged_base(run):
    from taskvec.modeling import resolve_model

    return _merged(resolve_model(run.base_model))


def test_fisher_merge_of_a_run_equals_the_reference(tiny_run, tmp_path):
    run = open_run(tiny_run)
    out = tmp_path / "fisher"
    merge({"run": str(tiny_run), "method": "fisher", "parameters": {"n_examples": 4}}, out, show_progress=False)
    merged = _merged(out)
    base = _merged_base(run)
    vecs = {t: run.vector(t).deltas for t in run.names}
    keys = sorted(vecs["a"])
    refs = {t: _ref_fisher(run.finetuned_model(t), run.kernel_batches(t, 4, batch_size=16), keys) for t in run.names}
    norms = {t: sum(float((v ** 2).sum()) for v in refs[t].values()) ** 0.5 for t in run.names}
    for key in ("encoder.layer.0.attention.self.key.weight", "encoder.layer.1.attention.self.value.weight"):
        F = [refs[t][key] / norms[t] + 1e-6 for t in run.names]
        want = base[key].double() + sum(f * vecs[t][key].double() for f, t in zip(F, run.names)) / sum(F)
        got = merged[next(n for n in merged if n.endswith(key))].double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got, base[key].double() + sum(vecs[t][key].double() for t in run.names) / 3,
                                  atol=1e-6)  # not the plain mean


def test_data_aware_configs_without_task_data_or_with_bad_parameters_are_refused(tiny_run, tmp_path):
    run = open_run(tiny_run)
    cfg = {"method": "regmean", "base_model": run.base_model,
           "models": [str(run.vector_path("a")), str(run.vector_path("b"))]}
    with pytest.raises(MergeError, match="needs each task's data: give 'run: RUN'"):
        merge(cfg, tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(MergeError, match="alpha = 1.5: alpha must be in \\[0, 1\\]"):
        merge({"run": str(tiny_run), "method": "regmean", "parameters": {"alpha": 1.5}}, tmp_path / "y")
    with pytest.raises(MergeError, match="unknown parameter 'density' for method 'fisher'"):
        merge({"run": str(tiny_run), "method": "fisher", "parameters": {"density": 0.5}}, tmp_path / "y")
    with pytest.raises(MergeError, match="is not data-aware"):
        run_statistics(run, "ties", ["a"], ["x"])
    with pytest.raises(MergeError, match="not a parameter of the task model"):
        gram_statistics(run.finetuned_model("a"), run.kernel_batches("a", 2), ["encoder.layer.9.nope.weight"])


def test_validation_measures_the_merge_that_taskvec_merge_writes(tiny_run, tmp_path):
    """validate_run's measured accuracy of regmean / fisher equals the accuracy of the directory `taskvec
    merge` writes for the same config, re-evaluated from disk with each task's head."""
    from taskvec.linearize import accuracy, forward_outputs
    from taskvec.merge import MergeSpec
    from taskvec.modeling import load_task_model
    from taskvec.validation import validate_run

    specs = [MergeSpec("regmean", "regmean", {"n_examples": 6}), MergeSpec("fisher", "fisher", {"n_examples": 6})]
    res = validate_run(tiny_run, merges=specs, n_eval=24, n_kernel=6, rank=0, lambdas=[0.5], ntk_aware=False,
                       n_holdout=0, progress=False, out=tmp_path / "results.json", device="cpu")
    run = open_run(tiny_run)
    rows = {m["name"]: m for m in res["merges"]}
    for spec in specs:
        out = tmp_path / spec.name
        merge({"run": str(tiny_run), "method": spec.method, "parameters": spec.params}, out, show_progress=False)
        for t in run.names:
            model = load_task_model(out / "heads" / t, backbone=out)
            f, y = forward_outputs(model, run.eval_batches(t, 24))
            assert accuracy(f, y) == pytest.approx(rows[spec.name]["per_task"][t]["measured"], abs=1e-12), (spec, t)


# --- NTK-aware merges on disk; the merge validation recommends ---------------------------------------


def _disk_accuracy(out, run, t, n_eval):
    from taskvec.linearize import accuracy, forward_outputs
    from taskvec.modeling import load_task_model

    f, y = forward_outputs(load_task_model(out / "heads" / t, backbone=out), run.eval_batches(t, n_eval))
    return accuracy(f, y)


def test_ntk_aware_merge_of_a_run_is_lambda_times_validations_direction(tiny_run, tmp_path):
    from taskvec.validation.context import load_context
    from taskvec.validation.eigen import eigenspace_phase

    run = open_run(tiny_run)
    out = tmp_path / "ntk"
    merge({"run": str(tiny_run), "method": "ntk_aware_harmful", "parameters": {"lambda": 0.7, "rank": 2,
                                                                               "n_kernel": 6}}, out, show_progress=False)
    eig = eigenspace_phase(load_context(run, 1, 6, torch.device("cpu"), 0), 2, 6, ntk_aware=True, progress=False)
    merged, base = _merged(out), _merged_base(run)
    direction = eig.directions["ntk_harm_sum"]
    assert set(direction) == set(run.vector("a").deltas)
    for k, d in direction.items():
        name = next(n for n in merged if n.endswith(k))
        torch.testing.assert_close(merged[name], base[name] + 0.7 * d, rtol=0, atol=1e-6)
        assert not torch.allclose(d, sum(run.vector(t).deltas[k] for t in run.names), atol=1e-7)  # projected
    with pytest.raises(MergeError, match="merges every task of"):
        merge({"run": str(tiny_run), "method": "ntk_aware", "tasks": ["a", "b"]}, tmp_path / "sub")
    with pytest.raises(MergeError, match="set lambda instead of per-task weights"):
        merge({"run": str(tiny_run), "method": "ntk_aware", "tasks": {"a": {"weight": 2}, "b": {}, "c": {}}},
              tmp_path / "w")


def test_validate_write_best_writes_the_recommended_merge_with_its_measured_accuracy(tiny_run, tmp_path):
    import shutil

    import yaml

    from taskvec.cli import main
    from taskvec.validation.best import annotate_cards, candidates, merge_config, recommended

    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("validation"))  # other tests' results
    root, out = tmp_path / "run", tmp_path / "best"
    argv = ["validate", str(root), "--n-eval", "24", "--n-kernel", "6", "--rank", "2", "--write-best", str(out)]
    assert main(argv) == 0
    assert main(argv) == 2  # an existing DIR is refused (before validating) without --overwrite
    run = open_run(root)
    results = run.validation_results()
    cand = recommended(results)
    assert cand["measured"] == max(c["measured"] for c in candidates(results))
    grid = next(c for c in candidates(results) if "measured grid's best" in c["name"])  # the grid is a candidate
    assert grid["params"]["lambda"] == results["coefficients"]["grid_best_lambda"]
    assert grid["measured"] == pytest.approx(results["coefficients"]["grid_best_measured"], abs=1e-12)
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["method"] == cand["method"]
    card = (out / "README.md").read_text()
    assert "## Validation" in card and cand["name"] in card
    for t in run.names:
        assert _disk_accuracy(out, run, t, 24) == pytest.approx(cand["per_task"][t]["measured"], abs=1e-12), t
        assert f"| {t} | 24 | " in card and f"{100 * cand['per_task'][t]['measured']:.2f} |" in card
    # a merge written before validation (the pipeline's merge stage) gets its measured numbers in its card
    ties = tmp_path / "ties"
    merge({"run": str(root), "method": "ties", "parameters": {"density": 0.2, "lambda": 1.0}}, ties, show_progress=False)
    row = next(c for c in candidates(results) if c["name"] == "ties d=0.2")
    for _ in range(2):  # a second annotation replaces the first
        assert annotate_cards(results, {"ties d=0.2": ties, "tsv": tmp_path / "absent"}) == ["ties d=0.2"]
    card = (ties / "README.md").read_text()
    assert card.count("## Validation") == 1 and "Measured by `taskvec validate`" in card
    for t in run.names:
        assert _disk_accuracy(ties, run, t, 24) == pytest.approx(row["per_task"][t]["measured"], abs=1e-12)
        assert f"{100 * row['per_task'][t]['measured']:.2f} |" in card
    # every candidate written from its config reproduces its measured accuracy (NTK-aware ones included)
    for i, c in enumerate(candidates(results)):
        if c["method"] == "ntk_aware_harmful" or c["tasks"] is not None or "grid" in c["name"]:
            dest = tmp_path / f"candidate{i}"
            merge(merge_config(root, c, results), dest, show_progress=False)
            for t in run.names:
                assert _disk_accuracy(dest, run, t, 24) == pytest.approx(c["per_task"][t]["measured"], abs=1e-12)


def test_taskvec_merge_cli_writes_a_regmean_directory_and_refuses_one_without_a_run(tiny_run, tmp_path, capsys):
    import yaml

    from taskvec.cli import main

    cfg = tmp_path / "regmean.yaml"
    cfg.write_text(yaml.safe_dump({"run": str(tiny_run), "method": "regmean", "parameters": {"n_examples": 4}}))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "heads").iterdir()) == ["a", "b", "c"]
    assert yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())["method"] == "regmean"
    run = open_run(tiny_run)
    cfg.write_text(yaml.safe_dump({"method": "fisher", "base_model": run.base_model,
                                   "models": [str(run.vector_path("a")), str(run.vector_path("b"))]}))
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs each task's data" in err and not (tmp_path / "none").exists()


def test_merge_config_records_the_statistics_settings_used(tiny_run, tmp_path):
    import yaml

    merge({"run": str(tiny_run), "method": "regmean", "parameters": {"n_examples": 3}}, tmp_path / "o",
          show_progress=False)
    rec = yaml.safe_load((tmp_path / "o" / "merge_config.yaml").read_text())
    assert rec["parameters"] == {"n_examples": 3, "alpha": 0.9}
    assert "alpha: 0.9" in (tmp_path / "o" / "README.md").read_text()


def test_fisher_and_regmean_statistics_are_cached_in_the_run_and_invalidated_with_its_vectors(tiny_run, tmp_path,
                                                                                              monkeypatch):
    import os
    import shutil

    from taskvec.merge import data_aware

    root = tmp_path / "run"
    shutil.copytree(tiny_run, root, ignore=shutil.ignore_patterns("cache"))  # other tests' cached statistics
    run = open_run(root)
    keys = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.value.weight"]
    first = {m: run_statistics(run, m, ["a", "b"], keys, n_examples=6) for m in ("fisher", "regmean")}
    assert len(list((root / "cache").glob("*.safetensors"))) == 2

    def no(*a, **k):
        raise AssertionError("statistics recomputed")

    monkeypatch.setattr(data_aware, "_compute_statistics", no)
    for m, want in first.items():  # the cached statistics, bit for bit
        got = run_statistics(open_run(root), m, ["a", "b"], keys, n_examples=6)
        assert got.n_examples == want.n_examples and got.layout == want.layout
        for t in want.tensors:
            assert all(torch.equal(got.tensors[t][k], want.tensors[t][k]) for k in want.tensors[t])
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: not the cached ones
        run_statistics(open_run(root), "fisher", ["a", "b"], keys, n_examples=4)
    p = open_run(root).vector_path("a")  # a task re-fine-tuned: its vector rewritten
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="recomputed"):
        run_statistics(open_run(root), "fisher", ["a", "b"], keys, n_examples=6)


def test_the_merge_stage_and_validation_share_the_cached_fisher_statistics(tiny_run, tmp_path, monkeypatch):
    import shutil

    from taskvec.merge import data_aware

    root = tmp_path / "run"
    shutil.copytree(tiny_run, root, ignore=shutil.ignore_patterns("cache"))  # other tests' cached statistics
    merge({"run": str(root), "method": "fisher"}, tmp_path / "merged", show_progress=False)
    monkeypatch.setattr(data_aware, "_compute_statistics",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("statistics recomputed")))
    run = open_run(root)
    base = {k: p.detach() for k, p in run.backbone().named_parameters()}
    got = merge_run_vectors(run, list(run.vectors().values()), "fisher", base, run.names)
    written = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    k = next(iter(got))
    assert torch.allclose(base[k] + got[k], written[k], atol=1e-6)
