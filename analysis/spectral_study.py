"""Outcome study of the spectral (Raskutti–Wainwright–Yu) early-stopping rule (issue 4).

Judges ``--early-stopping spectral`` by test outcomes, not by how close it lands to the validation-best step:

1. **Grid** (stage ``runs``): for every (task, optimiser, seed) one fine-tuning of the base model on a small,
   label-noised training set (``label_noise`` of the training *and* validation labels flipped, test labels
   clean), run to ``max_steps`` with the spectral rule in ``action=log`` mode (it records its predicted
   step and asks for an evaluation there), validation *and* test loss/accuracy logged on a regular step grid
   (``test_curve``: test metrics are never shown to a rule). The rule's θ0 kernel is cached, so the SGD and
   AdamW runs of one (task, seed) share it.
2. **Post hoc** (stage ``analyse``), from the saved curves only: the step each policy keeps —
   validation patience (the practical baseline), the validation minimum, the spectral step, the best fixed
   budget (one step count per (task, optimiser), chosen for the lowest mean *test* loss over seeds: an
   oracle), and training to the end — and each policy's test-loss regret (relative) and accuracy regret
   (points) against validation patience; the issue's criterion: regret ≤ 10% or ≤ 1 point on ≥ 80% of runs,
   and a lower mean test loss than both the best fixed budget and training to the end.
3. **Data gain** (stage ``gain``, on the seeds listed under ``data_gain``): the rule needs no validation set,
   so a run on train ∪ val (same flipped labels: :func:`taskvec.finetune.flip_labels` keys the flips by
   example), stopped at its own predicted step, against the validation-stopped run on train only.
4. **Rate check** (stage ``rate``): test squared error vs training-set size n (geometric grid) of the
   linearised model — kernel regression on the θ0 eNTK of the logit difference, warm-started at the probe —
   beside the exponent ``α/(α+1)`` predicted from the kernel's eigenvalue decay (``taskvec.spectrum.fit_decay``).

Writes ``OUT/study.json`` (every number the tables show), ``analysis/results/spectral_study_<device>.md`` and,
with ``--readme``, the README section between the ``<!-- spectral-study -->`` markers.

    PYTHONUNBUFFERED=1 nice -n 19 .venv/bin/python analysis/spectral_study.py \\
        --config analysis/configs/spectral_study_cpu.yaml --out runs/spectral_study --readme
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from taskvec.finetune import FinetuneConfig, finetune_task
from taskvec.io import replace_marked_section, write_json
from taskvec.tasks import Splits, load_task, make_splits

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("runs", "rate", "gain", "analyse")
POLICIES = ["patience", "val_min", "spectral", "fixed_budget", "fixed_val", "end"]


# --- configuration -------------------------------------------------------------------------------------------


def load_config(path) -> dict:
    """The study's YAML (see ``analysis/configs/spectral_study_cpu.yaml``), with its required keys checked."""
    cfg = yaml.safe_load(Path(path).read_text())
    need = ["tasks", "optimizers", "seeds", "n_train", "label_noise", "val_size", "test_size", "finetune", "lr"]
    missing = [k for k in need if k not in cfg]
    if missing:
        raise SystemExit(f"{path}: missing keys {missing}")
    bad = [o for o in cfg["optimizers"] if o not in ("sgd", "adamw")]
    if bad:
        raise SystemExit(f"{path}: unknown optimizers {bad}; valid: sgd, adamw")
    return cfg


def study_splits(task, seed: int, cfg: dict) -> Splits:
    """Seeded stratified split: ``n_train`` training examples, ``val_size`` / ``test_size`` held out."""
    return make_splits(task, seed, cfg["test_size"], cfg["val_size"], max_train=cfg["n_train"],
                       max_test_fraction=cfg.get("max_test_fraction", 0.2),
                       max_val_fraction=cfg.get("max_val_fraction", 0.1))


def finetune_config(cfg: dict, opt: str, seed: int, cache: Path, **over) -> FinetuneConfig:
    spectral = dict(cfg.get("spectral", {}), cache_dir=str(cache))
    kw = dict(cfg["finetune"], scope=cfg.get("scope", "qkv"), optimizer=opt, lr=float(cfg["lr"][opt]),
              grad_clip=cfg.get("grad_clip", {}).get(opt, 1.0), seed=seed, label_noise=float(cfg["label_noise"]),
              test_curve=True, early_stopping=["spectral"], rule_args={"spectral": spectral}, device="cpu",
              max_train=None)
    kw.update(over)
    return FinetuneConfig(**kw)


def _runs(cfg, seeds=None):
    """(task, optimiser, seed), seed-major: a study cut short still has every task and optimiser."""
    for seed in cfg["seeds"] if seeds is None else seeds:
        for name in cfg["tasks"]:
            for opt in cfg["optimizers"]:
                yield name, opt, seed


def run_path(out: Path, name: str, opt: str, seed: int, kind: str = "runs") -> Path:
    return out / kind / name / opt / f"seed{seed}"


def _log(path: Path) -> dict | None:
    p = path / "log.json"
    return json.loads(p.read_text()) if p.exists() else None


def _timed(out: Path, stage: str, seconds: float) -> None:
    p = out / "timing.json"
    t = json.loads(p.read_text()) if p.exists() else {}
    t[stage] = t.get(stage, 0.0) + seconds
    write_json(p, t)


# --- stage 1: the grid of fine-tunings --------------------------------------------------------------------------


def run_grid(cfg: dict, out: Path, seeds=None) -> None:
    base = cfg.get("base", "minilm")
    tasks = {}
    for name, opt, seed in _runs(cfg, seeds):
        d = run_path(out, name, opt, seed)
        if _log(d) is not None:
            continue
        task = tasks.setdefault(name, load_task(name))
        t0 = time.time()
        fc = finetune_config(cfg, opt, seed, out / "kernels")
        # overwrite=False: an interrupted run resumes from its checkpoint (the finished folder does not exist yet)
        finetune_task(base, task, d, fc, splits=study_splits(task, seed, cfg), progress=False)
        log = _log(d)
        rule = log["rules"][0]
        print(f"[runs] {name} {opt} seed {seed}: {time.time() - t0:.0f} s; spectral step {rule['predicted_step']} "
              f"(kernel {rule['kernel_cache']}, {rule['seconds']:.0f} s); val-best {log['best_step']}; "
              f"test loss at end {log['curve'][-1]['test_loss']:.3f}", flush=True)


# --- stage 3: data gain ----------------------------------------------------------------------------------------


def gain_holdout(s: Splits, seed: int, cfg: dict) -> list[int]:
    """The validation examples the data-gain comparison holds out: ``data_gain.val_examples`` of the study's
    validation split, drawn with the run's seed (all of it when that key is absent or null)."""
    m = cfg.get("data_gain", {}).get("val_examples")
    if m is None or int(m) >= len(s.val):
        return list(s.val)
    rng = np.random.default_rng(10_000 + seed)
    return sorted(rng.choice(np.asarray(s.val), size=int(m), replace=False).tolist())


def run_gain(cfg: dict, out: Path) -> None:
    """Per (task, optimiser, seed) in ``data_gain.seeds``: the rule on train ∪ V (no validation set), and — when
    ``data_gain.val_examples`` makes V a subset of the study's validation split — validation patience on train
    with V as its validation set (with the whole split the grid's patience replay is that baseline)."""
    base = cfg.get("base", "minilm")
    dg = cfg.get("data_gain", {})
    seeds = dg.get("seeds", [])
    tasks = {}
    for name, opt, seed in _runs(cfg):
        if seed not in seeds:
            continue
        task = tasks.setdefault(name, load_task(name))
        s = study_splits(task, seed, cfg)
        V = gain_holdout(s, seed, cfg)
        arms = [("gain", Splits(sorted(s.train + V), [], s.test, seed, dict(s.info, union_of="train+val",
                                                                             n_val_held=len(V))))]
        if len(V) < len(s.val):
            arms.append(("gain_val", Splits(list(s.train), V, s.test, seed, dict(s.info, val_subset=len(V)))))
        for kind, splits in arms:
            d = run_path(out, name, opt, seed, kind)
            if _log(d) is not None:
                continue
            t0 = time.time()
            if kind == "gain":
                fc = finetune_config(cfg, opt, seed, out / "kernels", test_curve=False)
                fc.rule_args["spectral"]["action"] = "stop"
            else:  # the practical baseline, live: patience on the small validation set, best checkpoint kept
                fc = finetune_config(cfg, opt, seed, out / "kernels", test_curve=False, early_stopping=["patience"],
                                     rule_args={}, patience=int(cfg.get("patience", 2)))
            finetune_task(base, task, d, fc, splits=splits, progress=False)
            log = _log(d)
            print(f"[{kind}] {name} {opt} seed {seed}: {time.time() - t0:.0f} s; n = {len(splits.train)}, val "
                  f"{len(splits.val)}, kept step {log['best_step']} of {log['steps']}; test loss {log['test_loss']:.3f}",
                  flush=True)


# --- stage 4: rate check ---------------------------------------------------------------------------------------


def _gradient_flow(lam, U, r, K_test, eta):
    """Warm-started kernel gradient flow on the squared loss after cumulative step(s) ``eta``: the fitted
    change on the test rows, ``K_test·a`` with ``a = U diag((1 − e^{−ηλ̂})/(nλ̂)) Uᵀ r`` (λ̂ of ``K/n``)."""
    n = lam.size
    lam = np.clip(lam, 1e-300, None)
    eta = np.atleast_1d(np.asarray(eta, dtype=np.float64))
    c = U.T @ r  # (n,)
    g = -np.expm1(-np.outer(lam, eta)) / (n * lam[:, None])  # (n, E)
    return K_test @ (U @ (g * c[:, None]))  # (n_test, E)


def rate_check(cfg: dict, out: Path) -> dict:
    """Error vs n of the linearised model on one θ0 kernel per task (see module docstring)."""
    from taskvec.finetune import build_task_model
    from taskvec.modeling import load_tokenizer
    from taskvec.ntk import as_batch, empirical_ntk
    from taskvec.spectral import estimate_sigma, rkhs_norm_sq, spectral_stopping_step
    from taskvec.spectrum import fit_decay, kernel_ridge_cv, kernel_ridge_predict
    from taskvec.tasks import Batches

    rc = cfg["rate"]
    base = cfg.get("base", "minilm")
    results = {}
    for name in rc["tasks"]:
        path = out / "rate" / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        t0 = time.time()
        task = load_task(name)
        if task.num_labels != 2:
            raise SystemExit(f"rate check: {name} has {task.num_labels} classes; the logit-difference kernel "
                             "needs a binary task")
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(task))
        P, m_probe = int(rc["pool"]), int(rc.get("probe_examples", 256))
        pool, probe = perm[:P].tolist(), perm[P:P + m_probe].tolist()
        tok = load_tokenizer(base)
        L = cfg["finetune"].get("max_length", 64)
        fc = FinetuneConfig(early_stopping=["spectral"], max_length=L, device="cpu",  # eager attention
                            probe_C=float(cfg["finetune"].get("probe_C", 1.0)))
        model = build_task_model(base, task, tok, Batches(tok, task, probe, 64, max_length=L), fc, "cpu").eval()
        batch = as_batch(list(Batches(tok, task, pool, 64, max_length=L)))
        y = batch["labels"].numpy().copy()
        # output "margin" with every label set to class 0 is the logit difference g = f_0 − f_1 (o = 1)
        batch["labels"] = torch.zeros_like(batch["labels"])
        with torch.no_grad():
            logits = torch.cat([model(batch["input_ids"][a:a + 64], batch["attention_mask"][a:a + 64],
                                      batch.get("token_type_ids")[a:a + 64] if "token_type_ids" in batch else None)
                                for a in range(0, P, 64)]).double()
        g0 = (logits[:, 0] - logits[:, 1]).numpy()
        res = empirical_ntk(model, batch, params=cfg.get("scope", "qkv"), output="margin", kernel="full",
                            groups=False, chunk_size=cfg.get("spectral", {}).get("chunk_size"))
        K = res.kernel[:, :, 0, 0].numpy()
        kernel_s = time.time() - t0
        t = 1.0 - 2.0 * y  # +1 for class 0, −1 for class 1: the target of tanh(g/2) = p_0 − p_1
        f0 = np.tanh(g0 / 2)
        r = t - f0
        lam_pool = np.linalg.eigvalsh(0.5 * (K + K.T) / P)[::-1]
        fit = fit_decay(lam_pool)
        rows = []
        for n in rc["sizes"]:
            for rep in range(int(rc["repeats"])):
                g = np.random.default_rng(1000 * n + rep)
                S = np.sort(g.choice(P, size=n, replace=False))
                T = np.setdiff1d(np.arange(P), S)
                KS, KT = K[np.ix_(S, S)], K[np.ix_(T, S)]
                base_mse = float(((f0[T] - t[T]) ** 2).mean())
                cv = kernel_ridge_cv(KS, r[S][:, None], folds=min(5, n))
                pr = kernel_ridge_predict(KS, r[S][:, None], KT, cv["ridge"])[:, 0]
                krr = float(((f0[T] + pr - t[T]) ** 2).mean())
                lam, U = np.linalg.eigh(0.5 * (KS + KS.T) / n)
                lam, U = lam[::-1], U[:, ::-1]
                sig = estimate_sigma(KS, r[S], folds=min(5, n))["sigma"]
                R2 = rkhs_norm_sq(torch.as_tensor(KS), r[S], "pinv")["R2"]
                etas = np.concatenate([[0.0], np.geomspace(1e-3 / lam[0], 1e7 / lam[0], 400)])
                pred = spectral_stopping_step(lam, etas, sig, math.sqrt(max(R2, 1e-300)), cumulative=True)
                eta_hat = etas[-1] if pred.step is None else etas[pred.step]
                path_mse = ((f0[T, None] + _gradient_flow(lam, U, r[S], KT, etas) - t[T, None]) ** 2).mean(0)
                sp = float(path_mse[np.searchsorted(etas, eta_hat)])
                rows.append({"n": int(n), "repeat": rep, "n_test": int(T.size), "base_mse": base_mse,
                             "krr_mse": krr, "krr_ridge": cv["ridge"], "spectral_mse": sp, "eta_hat": float(eta_hat),
                             "oracle_path_mse": float(path_mse.min()), "sigma": sig, "R2": R2})
        summary = _rate_summary(rows, fit)
        results[name] = {"task": name, "pool": P, "probe_examples": m_probe, "kernel_seconds": kernel_s,
                         "seconds": time.time() - t0, "decay": {k: getattr(fit, k) for k in
                                                                ("alpha", "r2", "start", "stop", "rate_exponent")},
                         "rows": rows, **summary}
        write_json(path, results[name])
        print(f"[rate] {name}: {time.time() - t0:.0f} s (kernel {kernel_s:.0f} s); α = {fit.alpha:.3f}, predicted "
              f"exponent {fit.rate_exponent:.3f}; measured {summary['fits']}", flush=True)
    return results


def _powerfit(ns, errs) -> dict:
    """Slope of log(error) on log(n) (error ∝ n^−b: returns b), and b of ``err = c + a·n^−b`` (floor c ≥ 0)."""
    x, yv = np.log(ns), np.log(errs)
    slope = float(np.polyfit(x, yv, 1)[0])
    out = {"exponent": -slope}
    try:
        from scipy.optimize import curve_fit

        p, _ = curve_fit(lambda n, c, a, b: c + a * n ** (-b), np.asarray(ns, float), np.asarray(errs, float),
                         p0=[0.5 * min(errs), max(errs), 0.5], bounds=([0, 0, 0], [min(errs), np.inf, 5]),
                         maxfev=20000)
        out.update(floor=float(p[0]), exponent_above_floor=float(p[2]))
    except Exception as e:  # noqa: BLE001 - a failed 3-parameter fit is reported, not fatal
        out.update(floor=None, exponent_above_floor=None, floor_fit_error=str(e)[:120])
    return out


def _rate_summary(rows, fit) -> dict:
    ns = sorted({r["n"] for r in rows})
    mean = {k: [float(np.mean([r[k] for r in rows if r["n"] == n])) for n in ns]
            for k in ("base_mse", "krr_mse", "spectral_mse", "oracle_path_mse")}
    fits = {k: _powerfit(ns, mean[k]) for k in ("krr_mse", "spectral_mse", "oracle_path_mse")}
    return {"sizes": ns, "mean": mean, "fits": {k: round(v["exponent"], 3) for k, v in fits.items()},
            "fit_details": fits, "predicted_exponent": fit.rate_exponent}


# --- stage 2: post hoc analysis ----------------------------------------------------------------------------------


def patience_step(curve: list[dict], patience: int) -> int:
    """The step validation patience keeps on a regular grid: stop after ``patience`` evaluations without a
    lower ``val_loss``, keep the best evaluation so far (the loop's rule, replayed on the saved curve)."""
    best, best_step, bad = math.inf, curve[0]["step"], 0
    for e in curve:
        if e["val_loss"] < best:
            best, best_step, bad = e["val_loss"], e["step"], 0
        else:
            bad += 1
            if bad >= patience:
                break
    return best_step


def fixed_budget_step(curves: list[list[dict]], key: str) -> int:
    """The step, among those every curve evaluated, with the lowest mean ``key`` over the curves (seeds)."""
    common = sorted(set.intersection(*[{e["step"] for e in c} for c in curves]))
    mean = {s: float(np.mean([_at(c, s, key) for c in curves])) for s in common}
    return int(min(mean, key=mean.get))


def _at(curve: list[dict], step: int, key: str) -> float:
    """``key`` at ``step``: measured when the curve has that step, else linear interpolation in the step."""
    steps = [e["step"] for e in curve]
    if step in steps:
        return curve[steps.index(step)][key]
    return float(np.interp(step, steps, [e[key] for e in curve]))


def analyse(cfg: dict, out: Path) -> dict:
    ft = cfg["finetune"]

    def grid(c):
        return [e for e in c if e["step"] % ft["eval_every"] == 0 or e["step"] == ft["max_steps"]]

    runs = []
    for name, opt, seed in _runs(cfg):
        log = _log(run_path(out, name, opt, seed))
        if log is None:
            continue
        curve, rule = log["curve"], log["rules"][0]
        reg = grid(curve)
        pred = rule["predicted_step"]
        steps = {"patience": patience_step(reg, int(cfg.get("patience", 2))),
                 "val_min": min(reg, key=lambda e: e["val_loss"])["step"],
                 "spectral": reg[-1]["step"] if pred is None else int(min(pred, reg[-1]["step"])),
                 "end": reg[-1]["step"]}
        variants = {k: (reg[-1]["step"] if v is None else min(int(v), reg[-1]["step"]))
                    for k, v in rule.get("predicted_step_by_choice", {}).items()}
        row = {"task": name, "optimizer": opt, "seed": seed, "steps": steps, "predicted_step": pred,
               "beyond_budget": pred is None, "sigma": rule["sigma"], "R2": rule["R2"],
               "predicted_eta": rule["predicted_eta"], "kernel_cache": rule.get("kernel_cache"),
               "kernel_seconds": rule["seconds"], "wall_time_s": log["wall_time_s"],
               "label_noise": {k: v for k, v in (log.get("label_noise") or {}).items() if k != "flipped"},
               "grid": [{k: e[k] for k in ("step", "val_loss", "val_accuracy", "test_loss", "test_accuracy")}
                        for e in reg],
               "test_loss": {k: _at(curve, s, "test_loss") for k, s in steps.items()},
               "test_accuracy": {k: _at(curve, s, "test_accuracy") for k, s in steps.items()},
               "variant_steps": variants,
               "variant_test_loss": {k: _at(curve, s, "test_loss") for k, s in variants.items()},
               "variant_test_accuracy": {k: _at(curve, s, "test_accuracy") for k, s in variants.items()}}
        runs.append(row)
    # best fixed budget per (task, optimiser): the grid step with the lowest mean test loss over seeds (an
    # oracle), and the practical version chosen on the mean *validation* loss over seeds
    fixed = {}
    for name in cfg["tasks"]:
        for opt in cfg["optimizers"]:
            rs = [r for r in runs if r["task"] == name and r["optimizer"] == opt]
            if not rs:
                continue
            for policy, key in (("fixed_budget", "test_loss"), ("fixed_val", "val_loss")):
                best = fixed_budget_step([r["grid"] for r in rs], key)
                fixed.setdefault(policy, {})[f"{name}/{opt}"] = best
                for r in rs:
                    r["steps"][policy] = best
                    r["test_loss"][policy] = _at(r["grid"], best, "test_loss")
                    r["test_accuracy"][policy] = _at(r["grid"], best, "test_accuracy")
    policies = POLICIES
    for r in runs:
        L0, A0 = r["test_loss"]["patience"], r["test_accuracy"]["patience"]
        r["loss_regret"] = {k: (r["test_loss"][k] - L0) / L0 for k in policies}
        r["acc_regret_points"] = {k: 100 * (A0 - r["test_accuracy"][k]) for k in policies}
        r["variant_loss_regret"] = {k: (v - L0) / L0 for k, v in r["variant_test_loss"].items()}
        r["variant_acc_regret_points"] = {k: 100 * (A0 - r["variant_test_accuracy"][k])
                                          for k in r["variant_test_accuracy"]}
    groups = {f"{r['task']}/{r['optimizer']}" for r in runs}
    per_group = {g: _summarise([r for r in runs if f"{r['task']}/{r['optimizer']}" == g], policies)
                 for g in sorted(groups, key=lambda g: (cfg["tasks"].index(g.split("/")[0]), g))}
    by_opt = {o: _summarise([r for r in runs if r["optimizer"] == o], policies) for o in cfg["optimizers"]}
    overall = _summarise(runs, policies)
    gain = _gain_rows(cfg, out, runs)
    rate = {}
    for name in cfg.get("rate", {}).get("tasks", []):
        p = out / "rate" / f"{name}.json"
        if p.exists():
            rate[name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "rows"}
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    expected = list(_runs(cfg))
    in_progress = []
    for name, opt, seed in expected:
        d = run_path(out, name, opt, seed)
        st = d.parent / f".{d.name}.ckpt" / "state.json"
        if _log(d) is None and st.exists():
            s = json.loads(st.read_text())
            rule = (s.get("rules") or [{}])[0].get("info", {})
            in_progress.append({"task": name, "optimizer": opt, "seed": seed, "step": s["step"],
                                "predicted_step": rule.get("predicted_step"),
                                "curve": [{k: e.get(k) for k in ("step", "val_loss", "test_loss", "test_accuracy")}
                                          for e in s["curve"]]})
    return {"config": cfg, "expected_runs": len(expected), "in_progress": in_progress, "runs": runs, "fixed_budget_steps": fixed, "per_group": per_group, "by_optimizer": by_opt,
            "overall": overall, "gain": gain, "rate": rate, "timing_s": timing,
            "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"}


def _summarise(rs: list[dict], policies) -> dict:
    if not rs:
        return {}
    ok_loss = [r["loss_regret"]["spectral"] <= 0.10 for r in rs]
    ok_acc = [r["acc_regret_points"]["spectral"] <= 1.0 for r in rs]
    variants = sorted({k for r in rs for k in r["variant_loss_regret"]})
    return {
        "runs": len(rs),
        "within_10pct_loss": float(np.mean(ok_loss)),
        "within_1pt_acc": float(np.mean(ok_acc)),
        "within_either": float(np.mean([a or b for a, b in zip(ok_loss, ok_acc)])),
        "mean_test_loss": {k: float(np.mean([r["test_loss"][k] for r in rs])) for k in policies},
        "mean_test_accuracy": {k: float(np.mean([r["test_accuracy"][k] for r in rs])) for k in policies},
        "mean_loss_regret": {k: float(np.mean([r["loss_regret"][k] for r in rs])) for k in policies},
        "median_steps": {k: float(np.median([r["steps"][k] for r in rs])) for k in policies},
        "spectral_steps": [r["predicted_step"] for r in rs],
        "patience_steps": [r["steps"]["patience"] for r in rs],
        "beyond_budget": int(sum(r["beyond_budget"] for r in rs)),
        "variants_within_either": {v: float(np.mean([r["variant_loss_regret"][v] <= 0.10
                                                     or r["variant_acc_regret_points"][v] <= 1.0 for r in rs
                                                     if v in r["variant_loss_regret"]])) for v in variants},
    }


def _gain_rows(cfg: dict, out: Path, runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        log = _log(run_path(out, r["task"], r["optimizer"], r["seed"], "gain"))
        if log is None:
            continue
        rule = log["rules"][0]
        if cfg.get("data_gain", {}).get("val_examples") is None:  # baseline: the grid's patience replay
            base_loss, base_acc, base_step = (r["test_loss"]["patience"], r["test_accuracy"]["patience"],
                                              r["steps"]["patience"])
        else:
            b = _log(run_path(out, r["task"], r["optimizer"], r["seed"], "gain_val"))
            if b is None:
                continue
            base_loss, base_acc, base_step = b["test_loss"], b["test_accuracy"], b["best_step"]
        rows.append({"task": r["task"], "optimizer": r["optimizer"], "seed": r["seed"],
                     "n_union": rule["n_train"], "predicted_step": rule["predicted_step"], "stopped_at": log["steps"],
                     "test_loss": log["test_loss"], "test_accuracy": log["test_accuracy"],
                     "val_stopped_test_loss": base_loss, "val_stopped_test_accuracy": base_acc,
                     "val_stopped_step": base_step,
                     "spectral_train_only_test_loss": r["test_loss"]["spectral"],
                     "spectral_train_only_test_accuracy": r["test_accuracy"]["spectral"],
                     "wall_time_s": log["wall_time_s"]})
    return rows


# --- report ----------------------------------------------------------------------------------------------------

NAMES = {"patience": "val patience", "val_min": "val min", "spectral": "spectral", "fixed_budget": "best fixed (oracle)",
         "fixed_val": "best fixed (val)", "end": "train to end"}


def report(res: dict, command: str) -> str:
    cfg, ft = res["config"], res["config"]["finetune"]
    o = res["overall"]
    if not o:
        prog = [f"{r['task']}/{r['optimizer']}/seed {r['seed']} at step {r['step']} of {ft['max_steps']} (spectral step "
                f"{'end' if r['predicted_step'] is None else r['predicted_step']}; step: validation loss / test loss / "
                "test accuracy " + ", ".join(f"{e['step']}: {e['val_loss']:.3f} / {e['test_loss']:.3f} / "
                                             f"{100 * e['test_accuracy']:.1f}%" for e in r["curve"]) + ")"
                for r in res["in_progress"]]
        timing = ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["timing_s"].items()) or "none finished"
        return (f"**Not measured yet: no run of the {res['expected_runs']} planned has finished** (`{command}` on "
                f"{res['hardware']}; stages timed so far: {timing}). The outcome criterion, "
                "the data gain and the rate check have no numbers yet; rerunning the command resumes the study. "
                "In progress: " + "; ".join(prog or ["nothing"]) + ".\n")
    partial = o["runs"] < res["expected_runs"]
    P = POLICIES
    lines = [
        f"Measured by `{command}` on {res['hardware']}. "
        "Wall time: " + (", ".join(f"{k} {v / 60:.1f} min" for k, v in res["timing_s"].items())
                         or "no stage completed") + f"; the finished runs took {sum(r['wall_time_s'] for r in res['runs']) / 60:.1f} "
        "min of wall time between them.",
        "",
        f"Setup: base `{cfg.get('base', 'minilm')}`, scope `{cfg.get('scope', 'qkv')}`, tasks "
        f"{', '.join(cfg['tasks'])}; n_train = {cfg['n_train']}, {100 * cfg['label_noise']:.0f}% of the training and "
        f"validation labels flipped (test clean); validation {cfg['val_size']}, test {cfg['test_size']} "
        f"(capped at {100 * cfg.get('max_val_fraction', 0.1):.0f}% / {100 * cfg.get('max_test_fraction', 0.2):.0f}% "
        f"of a task); batch {ft['batch_size']}, {ft['max_steps']} steps, evaluation every {ft['eval_every']} steps plus "
        f"the rule's own step; max_length {ft['max_length']}; loss {ft.get('loss', 'ce')}; lr "
        + ", ".join(f"{k} {v:g}" for k, v in cfg["lr"].items()) + f"; seeds {cfg['seeds']}. Spectral rule: "
        + ", ".join(f"{k}={v}" for k, v in cfg.get("spectral", {}).items()) + " (defaults otherwise). Baseline = "
        f"validation patience ({cfg.get('patience', 2)} evaluations, best validation loss kept), replayed on the "
        "saved curve. The best fixed budget is one step count per task and optimiser, chosen either on the *test* "
        "loss (mean over seeds: an oracle) or on the validation loss (mean over seeds: what a practitioner can do).",
        "",
        (f"**Partial results: {o['runs']} of {res['expected_runs']} planned runs finished** (the study was cut short; "
         "rerunning the same command resumes it). Every number below is over the finished runs only; a best fixed "
         "budget over fewer than 3 seeds is an even stronger oracle." if partial else
         f"All {o['runs']} planned runs finished."),
        "",
        ("**Criterion** (issue 4; over the finished runs only, so not a verdict)" if partial else
         "**Criterion** (issue 4)") + ": spectral within 10% test-loss regret or 1 accuracy point of validation stopping "
        f"on ≥ 80% of runs: **{100 * o['within_either']:.0f}%** of {o['runs']} runs "
        f"({'met' if o['within_either'] >= 0.8 else 'missed'}); mean test loss below the best fixed budget "
        f"({o['mean_test_loss']['spectral']:.4f} vs {o['mean_test_loss']['fixed_budget']:.4f} chosen on test, an oracle: "
        f"{'met' if o['mean_test_loss']['spectral'] < o['mean_test_loss']['fixed_budget'] else 'missed'}; "
        f"vs {o['mean_test_loss']['fixed_val']:.4f} chosen on the validation loss: "
        f"{'met' if o['mean_test_loss']['spectral'] < o['mean_test_loss']['fixed_val'] else 'missed'}) and below "
        f"training to the end ({o['mean_test_loss']['end']:.4f}: "
        f"{'met' if o['mean_test_loss']['spectral'] < o['mean_test_loss']['end'] else 'missed'}).",
        "",
        "| task / optimiser | runs | spectral steps | patience steps | ≤10% loss | ≤1 pt acc | either | "
        + " | ".join(f"test loss: {NAMES[k]}" for k in P) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(P),
    ]

    def row(label, s):
        st = ", ".join("end" if x is None else str(x) for x in s["spectral_steps"])
        return (f"| {label} | {s['runs']} | {st} | {', '.join(map(str, s['patience_steps']))} | "
                f"{100 * s['within_10pct_loss']:.0f}% | {100 * s['within_1pt_acc']:.0f}% | {100 * s['within_either']:.0f}% | "
                + " | ".join(f"{s['mean_test_loss'][k]:.4f}" for k in P) + " |")

    for g, s in res["per_group"].items():
        lines.append(row(g, s))
    for opt, s in res["by_optimizer"].items():
        if s:
            lines.append(row(f"**all {opt}**", s).replace("| " + ", ".join(
                "end" if x is None else str(x) for x in s["spectral_steps"]) + " |", "| |", 1))
    lines.append(row("**all**", o).replace("| " + ", ".join(
        "end" if x is None else str(x) for x in o["spectral_steps"]) + " |", "| |", 1))
    lines += ["", "Mean test accuracy (%) by policy:", "",
              "| | " + " | ".join(NAMES[k] for k in P) + " |", "|---|" + "---|" * len(P)]
    for g, s in list(res["per_group"].items()) + [("**all**", o)]:
        lines.append(f"| {g} | " + " | ".join(f"{100 * s['mean_test_accuracy'][k]:.1f}" for k in P) + " |")
    fb = res["fixed_budget_steps"]
    lines += ["", "Best fixed budgets (steps; on test, an oracle / on validation): " + ", ".join(
        f"{k} {v} / {fb.get('fixed_val', {}).get(k, '–')}" for k, v in fb.get("fixed_budget", {}).items()) + "."]
    if o.get("variants_within_either"):
        lines += ["", "Other R² definitions (steps logged by the rule; test loss interpolated between grid points): "
                  "share of runs within 10% or 1 point: " + ", ".join(
                      f"{k} {100 * v:.0f}%" for k, v in o["variants_within_either"].items()) + "."]
    if res["gain"]:
        m = cfg.get("data_gain", {}).get("val_examples")
        held = ("the whole validation split" if m is None else
                f"{m} validation examples (the practical split: {cfg['n_train']} train / {m} validation; the "
                "baseline is a live patience run on that validation set, best checkpoint kept)")
        lines += ["", f"**Data gain** (no validation set needed: train on train ∪ V, stopped at the rule's own "
                  f"predicted step) vs validation patience on train only, with V = {held}:", "",
                  "| task / optimiser / seed | n (train ∪ val) | predicted step | test loss | acc (%) | "
                  "val-stopped, train only: loss | acc (%) | spectral, train only: loss | acc (%) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g in res["gain"]:
            lines.append(f"| {g['task']} / {g['optimizer']} / {g['seed']} | {g['n_union']} | "
                         f"{'end' if g['predicted_step'] is None else g['predicted_step']} | {g['test_loss']:.4f} | "
                         f"{100 * g['test_accuracy']:.1f} | {g['val_stopped_test_loss']:.4f} | "
                         f"{100 * g['val_stopped_test_accuracy']:.1f} | {g['spectral_train_only_test_loss']:.4f} | "
                         f"{100 * g['spectral_train_only_test_accuracy']:.1f} |")
        gl = np.mean([g["test_loss"] for g in res["gain"]])
        vl = np.mean([g["val_stopped_test_loss"] for g in res["gain"]])
        ga = np.mean([g["test_accuracy"] for g in res["gain"]])
        va = np.mean([g["val_stopped_test_accuracy"] for g in res["gain"]])
        lines.append(f"| **mean** | | | {gl:.4f} | {100 * ga:.1f} | {vl:.4f} | {100 * va:.1f} | | |")
        if len(res["gain"]) < o["runs"]:
            lines += ["", f"Data gain measured on seeds {cfg.get('data_gain', {}).get('seeds')} only (CPU budget)."]
    if res["rate"]:
        lines += ["", "**Rate check** (linearised model: warm-started kernel regression on the θ0 eNTK of the logit "
                  "difference, clean labels; test = the pool examples not trained on; error = squared error of "
                  "p₀ − p₁ against ±1; mean over draws):", "",
                  "| task | n grid | α (decay fit) | predicted exponent α/(α+1) | measured: kernel ridge (CV) | "
                  "spectral-stopped flow | oracle-stopped flow | above a fitted floor (KRR) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rt in res["rate"].items():
            fd = rt["fit_details"]
            fl = fd["krr_mse"].get("exponent_above_floor")
            lines.append(f"| {name} | {', '.join(map(str, rt['sizes']))} | {rt['decay']['alpha']:.3f} "
                         f"(R² {rt['decay']['r2']:.3f}) | {rt['predicted_exponent']:.3f} | {fd['krr_mse']['exponent']:.3f} | "
                         f"{fd['spectral_mse']['exponent']:.3f} | {fd['oracle_path_mse']['exponent']:.3f} | "
                         + ("n/a" if fl is None else f"{fl:.3f} (floor {fd['krr_mse']['floor']:.4f})") + " |")
            lines.append("")
            lines.append(f"Mean test squared error by n ({name}): " + "; ".join(
                f"n={n}: KRR {a:.4f}, spectral {b:.4f}, oracle {c:.4f}, θ0 {d:.4f}" for n, a, b, c, d in
                zip(rt["sizes"], rt["mean"]["krr_mse"], rt["mean"]["spectral_mse"], rt["mean"]["oracle_path_mse"],
                    rt["mean"]["base_mse"])) + ".")
    if res["in_progress"]:
        lines += ["", "Unfinished runs (curves so far, not counted above): " + "; ".join(
            f"{r['task']}/{r['optimizer']}/seed {r['seed']}: spectral step {r['predicted_step']}, test loss by step "
            + ", ".join(f"{e['step']}: {e['test_loss']:.3f}" for e in r["curve"]) for r in res["in_progress"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "analysis" / "configs" / "spectral_study_cpu.yaml"))
    p.add_argument("--out", default="runs/spectral_study")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--results", default=None, help="markdown output (default analysis/results/spectral_study_cpu.md)")
    p.add_argument("--readme", action="store_true", help="publish the tables into README.md")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for the runs stage (default: the config's)")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in a.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; valid: {', '.join(STAGES)}")
    seeds = None if a.seeds is None else [int(x) for x in a.seeds.split(",") if x]
    for stage, fn in (("runs", lambda c, o: run_grid(c, o, seeds)), ("rate", rate_check), ("gain", run_gain)):
        if stage in stages:
            t0 = time.time()
            fn(cfg, out)
            _timed(out, stage, time.time() - t0)
    if "analyse" in stages:
        res = analyse(cfg, out)
        write_json(out / "study.json", res)
        cmd = ("PYTHONUNBUFFERED=1 python analysis/spectral_study.py "
               f"--config {Path(a.config).resolve().relative_to(ROOT) if Path(a.config).resolve().is_relative_to(ROOT) else a.config} "
               f"--out {a.out}" + (f" --results {a.results}" if a.results else ""))
        text = report(res, cmd)
        print(text)
        dest = Path(a.results) if a.results else ROOT / "analysis" / "results" / "spectral_study_cpu.md"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("# Spectral early stopping: outcome study (CPU)\n\n" + text)
        if a.readme and not replace_marked_section(ROOT / "README.md", "spectral-study", text):
            print("README.md has no <!-- spectral-study:start/end --> markers; not published", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
