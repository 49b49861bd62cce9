"""Phase 6: the claims checked on examples the predictor did not see.

Predictions, their trust band and the coefficient choice all come from each task's evaluation subset.
Here every merge is measured again on a disjoint held-out subset of the test split (:meth:`Run.holdout`),
and each predicted accuracy change Δp (evaluation subset) is compared with the measured change Δh on the
held-out subset. The two subsets differ by sampling: the change of one example is −1, 0 or +1, so an
accuracy change measured on n examples has a standard error sd/√n, with sd the spread of the per-example
changes. A trusted prediction's promise on held-out examples is therefore |Δp − Δh| ≤ u + 2·se, with u its
own uncertainty and se = 100·sd·√(1/n_eval + 1/n_holdout) points, sd from the measured per-example changes on
the evaluation subset (``coverage``; with sd from the predicted ones, what could be said before merging:
``coverage_premerge``, which under-states the spread where predictions miss flips); the summary reports how
often that holds (coverage), the
errors of trusted and flagged predictions there, Spearman on held-out changes, and the coefficient
choices scored there: the λ that the measured grid picked on the evaluation subset against the global λ and
the per-task coefficients that the predictions picked (each choice made on one subset, scored on another).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..linearize import accuracy
from .context import Context
from .summary import spearman


def _entry(e: dict, measured: float, base: float, n_holdout: int) -> dict:
    """The held-out check of one (merge, task) prediction entry ``e``: the band u + 2·se with se from the
    spread of the measured per-example changes on the evaluation subset (``within_band``), and with se from
    the predicted ones (``within_band_premerge``, what the band promised before merging)."""
    k = math.sqrt(1 / max(e.get("n", 1), 1) + 1 / n_holdout)
    se_pre = 100 * e.get("change_sd", 0.0) * k
    se = 100 * e.get("change_sd_measured", e.get("change_sd", 0.0)) * k
    dp, dh = e["predicted"] - e["base"], measured - base
    u = e.get("uncertainty")
    u = u if u is not None else math.inf
    err = 100 * abs(dp - dh)
    return {"measured": measured, "base": base, "change_measured": dh, "error_points": err,
            "se_points": se, "band_points": u + 2 * se, "within_band": bool(err <= u + 2 * se),
            "se_points_premerge": se_pre, "within_band_premerge": bool(err <= u + 2 * se_pre)}


def calibration(rows: list[dict]) -> list[dict]:
    """The calibration table on held-out examples: for each uncertainty threshold, the predictions at or below
    it, their mean and largest held-out error and the share within their band u + 2·se (points)."""
    from .summary import CALIBRATION_THRESHOLDS

    out = []
    for u in CALIBRATION_THRESHOLDS:
        sel = [e["heldout"] for e in rows if e.get("uncertainty") is not None and e["uncertainty"] <= u]
        out.append({"max_uncertainty": None if math.isinf(u) else u, "n": len(sel),
                    "mae_points": float(np.mean([h["error_points"] for h in sel])) if sel else None,
                    "max_error_points": float(np.max([h["error_points"] for h in sel])) if sel else None,
                    "coverage": float(np.mean([h["within_band"] for h in sel])) if sel else None,
                    "coverage_premerge": (float(np.mean([h.get("within_band_premerge", h["within_band"])
                                                         for h in sel])) if sel else None)})
    return out


def holdout_phase(ctx: Context, merge_results: list[dict], deltas: dict, coefficients: dict,
                  progress: bool = True) -> dict | None:
    """Measure every merge of ``merge_results`` (``deltas[name]`` = its Δ) and the coefficient choices on the
    held-out subsets; adds ``heldout`` to every per-task entry and returns the held-out summary (``None``
    without held-out examples).

    Returns: ``n_holdout`` per task, ``spearman_change``, ``mae_points`` (all), ``mae_points_trusted`` /
    ``_untrusted``, ``coverage_trusted`` (share of trusted predictions within their widened band),
    ``mean_se_points``, ``coefficients`` (the grid's pick and the predictions' picks, measured on the held-out
    subset, and the gaps in points),
    ``evaluations`` (held-out evaluations spent).
    """
    from tqdm.auto import tqdm

    if not ctx.holdout_batches:
        return None
    names = [s for s in ctx.names if s in ctx.holdout_batches]  # tasks whose test split has examples to spare
    # labels in the batches' iteration order (length-sorted), the order of the measured logits
    labels = {s: torch.cat([b["labels"] for b in ctx.holdout_batches[s]]) for s in names}
    n_h = {s: len(ctx.holdout_batches[s].indices) for s in names}
    base = {s: accuracy(f, labels[s]) for s, f in ctx.measure(None, holdout=True).items()}
    ft = {s: accuracy(ctx.measure(ctx.vectors[s].deltas, holdout=True, tasks=[s])[s], labels[s]) for s in names}
    rows = []
    for m in tqdm(merge_results, desc="held-out merges", disable=not progress):
        logits = ctx.measure(deltas[m["name"]], holdout=True)
        for s, e in m["per_task"].items():
            if s in logits:
                e["heldout"] = _entry(e, accuracy(logits[s], labels[s]), base[s], n_h[s])
                rows.append(e)

    def avg_norm(cf) -> float:
        logits = ctx.measure(ctx.combination(cf), holdout=True)
        return float(np.mean([accuracy(logits[s], labels[s]) / ft[s] for s in names]))

    # each choice made on the evaluation subset — λ by measuring the grid there, coefficients by predicting —
    # scored on the held-out subset
    picks = {"grid_best": {t: coefficients["grid_best_lambda"] for t in ctx.names},
             "global": coefficients["chosen"]["global"]["coefficients"],
             "per_task": coefficients["chosen"]["per_task"]["coefficients"]}
    scored = {k: avg_norm(cf) for k, cf in tqdm(picks.items(), desc="coefficients (held-out)",
                                                  disable=not progress)}
    trusted = [e for e in rows if e["trusted"]]
    flagged = [e for e in rows if not e["trusted"]]

    def mae(es):
        return float(np.mean([e["heldout"]["error_points"] for e in es])) if es else None

    return {
        "tasks": names, "tasks_without_holdout": [s for s in ctx.names if s not in names],
        "n_holdout": n_h, "base_accuracy": base, "finetuned_accuracy": ft, "calibration": calibration(rows),
        "spearman_change": spearman([e["predicted"] - e["base"] for e in rows],
                                    [e["heldout"]["change_measured"] for e in rows]),
        "mae_points": mae(rows), "mae_points_trusted": mae(trusted), "mae_points_untrusted": mae(flagged),
        "n_trusted": len(trusted), "n_untrusted": len(flagged),
        "coverage_trusted": float(np.mean([e["heldout"]["within_band"] for e in trusted])) if trusted else None,
        "coverage_trusted_premerge": (float(np.mean([e["heldout"]["within_band_premerge"] for e in trusted]))
                                      if trusted else None),
        "mean_se_points": float(np.mean([e["heldout"]["se_points"] for e in rows])) if rows else None,
        "coefficients": {"grid_best_lambda": coefficients["grid_best_lambda"], "grid_best_measured": scored["grid_best"],
                         "chosen_global_measured": scored["global"], "chosen_per_task_measured": scored["per_task"],
                         "gap_points_global": 100 * (scored["grid_best"] - scored["global"]),
                         "gap_points_per_task": 100 * (scored["grid_best"] - scored["per_task"])},
        "evaluations": ctx.holdout_evaluations,
    }
