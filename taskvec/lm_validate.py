"""Predict and measure merges of a run's causal-LM tasks in the LM metric (mean NLL, nats per token).

``validate_lm_run(RUN)`` is the LM counterpart of :func:`taskvec.validation.validate_run` for runs whose
tasks were fine-tuned with an LM objective (``HeadSpec.kind == "lm"``, :mod:`taskvec.lm_objective`). Per
task s, on ``n_eval`` seeded test examples (:meth:`taskvec.runs.Run.sample`), at θ0:

* J_s·τ_t for every task vector (one batched JVP, memory-bounded) and ½·D²ℓ along Σ τ and along every
  other merge's own direction (:func:`taskvec.lm_predict.loglik_derivatives`);
* predicted change of the mean NLL for each merge (task arithmetic at every λ of ``lambdas``: first order
  λ·Σ_t J τ_t, second order λ²·½D²ℓ[Στ, Στ]; other methods along their merged delta) with its trust band in
  nats per token (:func:`taskvec.lm_predict.trust_band_nats`);
* measured: every merge applied to one shared backbone (restored exactly), the mean NLL of every task on
  the evaluation subset and on ``n_holdout`` other test examples (:meth:`Run.holdout`, never seen by the
  predictor); the interference matrix I[s, t] (change of task s's mean NLL when τ_t alone is added),
  predicted and measured; the global λ chosen from the predictions against the measured grid's best λ.

Summary: Spearman between predicted and measured per-task changes across merges (evaluation subset and
held-out examples), mean absolute errors of trusted and flagged predictions in nats per token, and the
calibration table (predictions with uncertainty ≤ u: how many, their mean and largest errors). Written to
``RUN/validation/lm_results.json``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from .errors import TaskvecError
from .io import check_output, write_json
from .lm_objective import LMBatches, resolve_objective
from .lm_predict import loglik_derivatives, mean_nll_change, measured_logliks, trust_band_nats
from .runs import device_of, open_run

DEFAULT_LAMBDAS = [0.25, 0.5, 0.75, 1.0]
CALIBRATION = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, float("inf")]
LAMBDA_GRID = [round(0.05 * i, 2) for i in range(1, 41)]


@contextlib.contextmanager
def applied(backbone, delta: dict[str, torch.Tensor]):
    """``backbone`` with ``delta`` (backbone-relative names) added inside the block; restored bit for bit."""
    params = dict(backbone.named_parameters())
    missing = [k for k in delta if k not in params]
    if missing:
        raise TaskvecError(f"tensors {missing[:3]} of the merged delta are not parameters of the backbone")
    orig = {k: params[k].detach().clone() for k in delta}
    try:
        with torch.no_grad():
            for k, d in delta.items():
                params[k].add_(d.to(params[k].device, params[k].dtype))
        yield backbone
    finally:
        with torch.no_grad():
            for k, o in orig.items():
                params[k].copy_(o)


def _spearman(a, b) -> float | None:
    from .validation.summary import spearman

    return spearman(a, b)


def _lm_batches(run, name: str, indices, batch_size: int) -> LMBatches:
    rt = run.task(name)
    if rt.head is None or rt.head.kind != "lm":
        raise TaskvecError(f"task {name!r} of {run.root} has a {getattr(rt.head, 'kind', None)!r} head, not an LM "
                           "head: validate_lm_run needs LM tasks (objective lm or choice); use taskvec validate")
    objective = resolve_objective((rt.log.get("config") or {}).get("objective", "auto"), rt.task)
    return LMBatches(run.tokenizer(), rt.task, indices, objective, batch_size=batch_size, max_length=rt.max_length,
                     sort_by_length=True)


def _calibration(rows: list[dict], key: str) -> list[dict]:
    out = []
    for u in CALIBRATION:
        errs = [abs(r["predicted"] - r[key]) for r in rows if r["uncertainty"] <= u and r["curvature"] < 1]
        out.append({"max_uncertainty": u, "n": len(errs), "mean_abs_error": float(np.mean(errs)) if errs else None,
                    "max_abs_error": float(np.max(errs)) if errs else None})
    return out


def _summary(rows: list[dict], max_uncertainty: float) -> dict:
    s: dict = {"n_predictions": len(rows)}
    for where, key in (("eval", "measured"), ("heldout", "measured_heldout")):
        trusted = [abs(r["predicted"] - r[key]) for r in rows if r["trusted"]]
        flagged = [abs(r["predicted"] - r[key]) for r in rows if not r["trusted"]]
        s[where] = {"spearman": _spearman([r["predicted"] for r in rows], [r[key] for r in rows]),
                    "spearman_1st": _spearman([r["predicted_1st"] for r in rows], [r[key] for r in rows]),
                    "mae_all": float(np.mean([abs(r["predicted"] - r[key]) for r in rows])),
                    "mae_no_change": float(np.mean([abs(r[key]) for r in rows])),
                    "mae_trusted": float(np.mean(trusted)) if trusted else None, "n_trusted": len(trusted),
                    "mae_flagged": float(np.mean(flagged)) if flagged else None,
                    "calibration": _calibration(rows, key)}
    s["max_uncertainty"] = max_uncertainty
    return s


def validate_lm_run(run, merges: list | None = None, lambdas: list[float] | None = None, n_eval: int = 60,
                    n_holdout: int | None = None, second_order: bool = True, max_uncertainty: float = 0.05,
                    max_memory: int | float | str | None = None, batch_size: int = 16, device: str | None = None,
                    out: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Predict, measure and compare merges of an LM run in mean NLL (nats per token); see the module doc.

    ``merges``: :class:`~taskvec.merge.memory.MergeSpec` besides task arithmetic at every λ of ``lambdas``;
    ``max_uncertainty``: the trust threshold in nats per token; ``n_holdout`` default ``n_eval``.
    """
    from tqdm.auto import tqdm

    from .merge.memory import merge_vectors

    t0 = time.time()
    run = open_run(run, require="vectors")
    out = Path(out) if out else run.stage_dir("validate") / "lm_results.json"
    check_output(out, overwrite)
    lambdas = list(DEFAULT_LAMBDAS if lambdas is None else lambdas)
    n_holdout = n_eval if n_holdout is None else n_holdout
    names, dev = run.names, device_of(device)
    vectors = run.vectors()
    bb = run.backbone(dev)
    models = {s: run.base_task_model(s, backbone=bb) for s in names}
    ev = {s: _lm_batches(run, s, run.sample(s, "test", n_eval), batch_size) for s in names}
    ho = {s: _lm_batches(run, s, run.holdout(s, n_eval, n_holdout), batch_size) for s in names}
    base_state = {k: p.detach().cpu() for k, p in bb.named_parameters()}
    sum_tau = merge_vectors(list(vectors.values()), "task_arithmetic", base_state, **{"lambda": 1.0})
    dirs = {f"tau:{t}": vectors[t].deltas for t in names}
    dirs["sum"] = sum_tau
    others = {m.name: merge_vectors(list(vectors.values()), m.method, base_state, **m.params) for m in merges or []}
    dirs.update(others)
    second = (["sum", *others] if second_order else [])
    der = {s: loglik_derivatives(models[s], ev[s], dirs, second, max_memory, dev)
           for s in tqdm(names, desc="LM predictions", disable=not progress)}
    t_pred = time.time() - t0

    def measure(delta):
        with applied(bb, delta):
            return {s: (measured_logliks(models[s], ev[s], dev), measured_logliks(models[s], ho[s], dev)) for s in names}

    base = {s: (der[s].f0, measured_logliks(models[s], ho[s], dev)) for s in names}
    n_ho = {s: (ho[s].batch(list(range(ho[s].num_examples)))["labels"] != -100).sum(1) for s in names}
    specs = [(f"task_arithmetic λ={lam:g}", lam, "sum", sum_tau) for lam in lambdas]
    specs += [(name, 1.0, name, d) for name, d in others.items()]
    rows, measured_avg = [], {}
    for label, lam, d, delta in tqdm(specs, desc="LM measurements", disable=not progress):
        scaled = {k: lam * v for k, v in delta.items()}
        got = measure(scaled)
        for s in names:
            D = der[s]
            first = lam * D.first[d]
            half = lam * lam * D.half_second[d] if d in D.half_second else torch.zeros_like(first)
            band = trust_band_nats(first, half, D.n_tokens, max_uncertainty)
            if d not in D.half_second:
                band.update(curvature=float("inf"), uncertainty=float("inf"), trusted=False)
            rows.append({"merge": label, "task": s, "base_nll": mean_nll_change(D.f0, D.n_tokens),
                         "predicted": band["predicted_change"], "predicted_1st": band["predicted_change_1st"],
                         "curvature": band["curvature"], "uncertainty": band["uncertainty"], "trusted": band["trusted"],
                         "measured": mean_nll_change(got[s][0] - base[s][0], D.n_tokens),
                         "measured_heldout": mean_nll_change(got[s][1] - base[s][1], n_ho[s])})
        if label.startswith("task_arithmetic"):
            measured_avg[lam] = float(np.mean([r["measured"] for r in rows[-len(names):]]))
    # interference: τ_t alone on task s, first order vs measured
    I_pred = [[mean_nll_change(der[s].first[f"tau:{t}"], der[s].n_tokens) for t in names] for s in names]
    I_meas = [[0.0] * len(names) for _ in names]
    for j, t in enumerate(names):
        got = measure(vectors[t].deltas)
        for i, s in enumerate(names):
            I_meas[i][j] = mean_nll_change(got[s][0] - base[s][0], der[s].n_tokens)

    def predicted_avg(lam):
        return float(np.mean([mean_nll_change(lam * der[s].first["sum"] + lam * lam * der[s].half_second.get(
            "sum", torch.zeros_like(der[s].first["sum"])), der[s].n_tokens) for s in names]))

    lam_star = min(LAMBDA_GRID, key=predicted_avg)
    got = measure({k: lam_star * v for k, v in sum_tau.items()})
    chosen = {"eval": float(np.mean([mean_nll_change(got[s][0] - base[s][0], der[s].n_tokens) for s in names])),
              "heldout": float(np.mean([mean_nll_change(got[s][1] - base[s][1], n_ho[s]) for s in names]))}
    lam_grid = min(measured_avg, key=measured_avg.get) if measured_avg else None
    summary = _summary(rows, max_uncertainty)
    off = [(I_pred[i][j], I_meas[i][j]) for i in range(len(names)) for j in range(len(names)) if i != j]
    res = {"run": str(run.root), "tasks": names, "unit": "mean NLL change, nats per token (negative = better)",
           "n_eval": n_eval, "n_holdout": n_holdout, "second_order": second_order, "rows": rows, "summary": summary,
           "interference": {"predicted": I_pred, "measured": I_meas,
                            "spearman_offdiag": _spearman(*zip(*off)) if len(off) > 2 else None},
           "coefficients": {"lambda_star": lam_star, "predicted_avg_at_lambda_star": predicted_avg(lam_star),
                            "measured_avg_at_lambda_star": chosen, "grid": measured_avg, "grid_best_lambda": lam_grid,
                            "grid_best_avg": measured_avg.get(lam_grid)},
           "timings_s": {"predictions": t_pred, "total": time.time() - t0}}
    write_json(out, res, overwrite=True)
    return res


def is_lm_run(run) -> bool:
    """Whether a run's tasks were fine-tuned with an LM objective (LM heads); all or none must be."""
    run = open_run(run, require="finetune")
    kinds = {getattr(run.task(t).head, "kind", None) == "lm" for t in run.names}
    if len(kinds) > 1:
        raise TaskvecError(f"{run.root} mixes LM and classification tasks; validate them in separate runs")
    return kinds == {True}


def pipeline_stage(out, section: dict, merges: list) -> dict:
    """The pipeline's ``validate`` stage for an LM run: :func:`validate_lm_run` with the keys of the config's
    ``validate`` section it accepts (``n_eval``, ``n_holdout``, ``lambdas``, ``second_order``,
    ``max_uncertainty``, ``max_memory``, ``device``, ``progress``) and the non-task-arithmetic merges."""
    import inspect

    keys = set(inspect.signature(validate_lm_run).parameters) - {"run", "merges", "out", "overwrite"}
    kw = {k: v for k, v in section.items() if k in keys}
    res = validate_lm_run(out, merges=[m for m in merges if m.method != "task_arithmetic"], overwrite=True, **kw)
    return {"summary": res["summary"], "path": str(run_path(out)), "coefficients": res["coefficients"],
            "interference": res["interference"]}


def run_path(out) -> Path:
    return open_run(out, require="vectors").stage_dir("validate") / "lm_results.json"
