"""Phase 4: task-arithmetic coefficients chosen from predictions (no measurement) against a measured grid
search over a global λ."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .context import Context, scale_deltas
from .measure import predict_and_measure
from .predict import Derivatives, Scorer

#: the global-λ grid the predictions are searched over (0.05 … 2.0)
FINE_GRID = np.round(np.arange(0.05, 2.0001, 0.05), 4).tolist()


def choose_coefficients(pred_avg: Callable[[dict[str, float]], float], names: list[str],
                        grid: list[float] | None = None, sweeps: int = 2) -> tuple[float, dict[str, float]]:
    """Coefficients that maximise a predicted score, from predictions only.

    ``pred_avg(coefs)`` scores ``{task: coefficient}``. First the best global λ on ``grid`` (ties: the λ
    nearest 0.5), then ``sweeps`` rounds of coordinate ascent on per-task coefficients within
    ``[0.5·λ*, 1.5·λ*]`` (ties: the current value). Returns ``(λ*, {task: c_t})``.
    """
    grid = FINE_GRID if grid is None else list(grid)
    lam_star = max(grid, key=lambda lam: (pred_avg({t: lam for t in names}), -abs(lam - 0.5)))
    coefs = {t: lam_star for t in names}
    window = [c for c in grid if 0.5 * lam_star <= c <= 1.5 * lam_star]  # stay near the trusted global λ
    for _ in range(sweeps):
        for t in names:
            coefs[t] = max(window, key=lambda c: (pred_avg({**coefs, t: c}), -abs(c - coefs[t])))
    return lam_star, coefs


def _avg_norm(per: dict, key: str, ft_acc: dict) -> float:
    return float(np.mean([per[s][key] / ft_acc[s] for s in per]))


def coefficient_phase(ctx: Context, der: Derivatives, scorer: Scorer, lambdas: list[float],
                      progress: bool = True) -> dict:
    """The measured global-λ grid (one full evaluation per λ) and the prediction-chosen global and
    per-task coefficients (one full evaluation each, to report how well they do).

    Returns the JSON ``results["coefficients"]``: ``grid`` (λ, measured and predicted average normalised
    accuracy), ``grid_best_lambda`` / ``grid_best_measured`` / ``grid_best_per_task`` (its per-task
    entries, so the grid's best is a ``--write-best`` candidate), ``grid_evaluations``, ``chosen`` (``global``
    and ``per_task``: coefficients, predicted, measured, per task), ``gap_points_*`` (grid best minus
    chosen, in points) and ``lambda_star``.
    """
    from tqdm.auto import tqdm

    names, ft = ctx.names, scorer.ft_acc
    grid = []
    before = ctx.evaluations
    for lam in tqdm(lambdas, desc="λ grid (measured)", disable=not progress):
        per = predict_and_measure(ctx, scorer, der.ta_terms({t: lam for t in names}), scale_deltas(ctx.sum_tau, lam))
        grid.append({"lambda": lam, "measured": _avg_norm(per, "measured", ft),
                     "predicted": _avg_norm(per, "predicted", ft), "per_task": per})
    grid_evals = ctx.evaluations - before
    lam_star, coefs = choose_coefficients(lambda cf: scorer.predicted_avg(*der.ta_terms(cf)), names)
    chosen = {}
    for label, cf in (("global", {t: lam_star for t in names}), ("per_task", coefs)):
        per = predict_and_measure(ctx, scorer, der.ta_terms(cf), ctx.combination(cf))
        chosen[label] = {"coefficients": cf, "predicted": _avg_norm(per, "predicted", ft),
                         "measured": _avg_norm(per, "measured", ft), "per_task": per}
    best = max(grid, key=lambda g: g["measured"])
    return {"grid": [{k: v for k, v in g.items() if k != "per_task"} for g in grid],
            "grid_best_lambda": best["lambda"], "grid_best_measured": best["measured"],
            "grid_best_per_task": best["per_task"],
            "grid_evaluations": grid_evals, "chosen": chosen, "chosen_evaluations": 1,
            "gap_points_global": 100 * (best["measured"] - chosen["global"]["measured"]),
            "gap_points_per_task": 100 * (best["measured"] - chosen["per_task"]["measured"]),
            "lambda_star": lam_star}
