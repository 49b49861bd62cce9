"""Phase 5: one summary over every (merge, task) prediction — pure functions of the saved JSON rows."""

from __future__ import annotations

import math

import numpy as np
import torch

#: thresholds (accuracy points) of the calibration table; ``inf`` = every prediction
CALIBRATION_THRESHOLDS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf"))


def spearman(a, b) -> float | None:
    """Spearman rank correlation, ``None`` below 3 points or for a constant input."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def calibration(rows: list[dict]) -> list[dict]:
    """Error of the predictions whose uncertainty is at most each threshold: ``[{max_uncertainty, n,
    mae_points, max_error_points}]`` (rows: per-task entries with ``predicted``, ``measured``,
    ``uncertainty``)."""
    out = []
    for u in CALIBRATION_THRESHOLDS:
        errs = [100 * abs(e["predicted"] - e["measured"]) for e in rows if e["uncertainty"] <= u]
        out.append({"max_uncertainty": None if math.isinf(u) else u, "n": len(errs),
                    "mae_points": float(np.mean(errs)) if errs else None,
                    "max_error_points": float(np.max(errs)) if errs else None})
    return out


def summarize(merges: list[dict], second_order: bool, max_uncertainty: float,
              I_pred: np.ndarray | None = None, I_meas: np.ndarray | None = None) -> dict:
    """Summary of predicted vs measured over all (merge, task) rows of ``merges`` (``[{per_task: {task:
    entry}}]``, entries as :meth:`taskvec.validation.predict.Scorer.entry`).

    Keys: ``n_predictions``, ``order``, ``spearman_change`` / ``_1st`` (on accuracy changes from θ0),
    ``spearman_accuracy``, ``mae_points`` / ``_1st`` and the no-change baseline, ``n_trusted`` /
    ``n_untrusted`` with their MAE, ``calibration`` (second order only), ``interference_spearman``
    (off-diagonal entries of the interference matrices, when given); where probes replaced flagged Taylor
    predictions (:mod:`~taskvec.validation.probe`): ``n_probed``, ``spearman_change_taylor`` /
    ``mae_points_taylor`` (the plain expansion everywhere), ``n_trusted_taylor`` / ``n_trusted_probe`` and their
    MAE, ``mae_points_probed``.
    """
    rows = [e for m in merges for e in m["per_task"].values()]
    dm = [e["measured"] - e["base"] for e in rows]

    def scores(key: str) -> tuple[float | None, float]:
        dp = [e[key] - e["base"] for e in rows]
        return spearman(dp, dm), 100 * float(np.mean([abs(a - b) for a, b in zip(dp, dm)]))

    summary = {"n_predictions": len(rows), "order": 2 if second_order else 1,
               "mae_points_nochange_baseline": 100 * float(np.mean([abs(x) for x in dm])),
               "max_uncertainty": max_uncertainty}
    summary["spearman_change"], summary["mae_points"] = scores("predicted")
    summary["spearman_change_1st"], summary["mae_points_1st"] = scores("predicted_1st")
    probed = [e for e in rows if e.get("predictor") == "probe"]
    summary["n_probe_checked"] = sum("probe_check" in e for e in rows)  # flagged, probed, expansion kept
    if probed:  # the plain Taylor expansion beside the probe-calibrated headline (probe.py)
        for e in rows:
            e.setdefault("predicted_taylor", e["predicted"])
        summary["spearman_change_taylor"], summary["mae_points_taylor"] = scores("predicted_taylor")
        taylor_ok = [100 * abs(e["predicted"] - e["measured"]) for e in rows if e.get("predictor") != "probe"
                     and e["trusted"]]
        probe_ok = [100 * abs(e["predicted"] - e["measured"]) for e in probed if e["trusted"]]
        summary.update({"n_probed": len(probed), "n_trusted_taylor": len(taylor_ok),
                        "n_trusted_probe": len(probe_ok),
                        "mae_points_trusted_taylor": float(np.mean(taylor_ok)) if taylor_ok else None,
                        "mae_points_trusted_probe": float(np.mean(probe_ok)) if probe_ok else None,
                        "mae_points_probed": 100 * float(np.mean([abs(e["predicted"] - e["measured"])
                                                                  for e in probed]))})
    summary["spearman_accuracy"] = spearman([e["predicted"] for e in rows], [e["measured"] for e in rows])
    trusted = [100 * abs(e["predicted"] - e["measured"]) for e in rows if e["trusted"]]
    flagged = [100 * abs(e["predicted"] - e["measured"]) for e in rows if not e["trusted"]]
    summary.update({"n_trusted": len(trusted), "n_untrusted": len(flagged),
                    "mae_points_trusted": float(np.mean(trusted)) if trusted else None,
                    "mae_points_untrusted": float(np.mean(flagged)) if flagged else None})
    if second_order:  # how the error grows with the predicted uncertainty: pick a threshold from this
        summary["calibration"] = calibration(rows)
    if I_pred is not None and I_meas is not None:
        off = ~np.eye(len(I_pred), dtype=bool)
        summary["interference_spearman"] = spearman(I_pred[off].tolist(), I_meas[off].tolist())
    return summary


def weight_space(vectors: list) -> dict:
    """Cosines of the task vectors and the share of sign conflicts among entries both change (T × T)."""
    from ..task_vector import TaskVector

    T = len(vectors)
    signs = np.zeros((T, T))
    for i in range(T):
        for j in range(T):
            a, b = vectors[i].deltas, vectors[j].deltas
            both = conflict = 0
            for k in a.keys() & b.keys():
                nz = (a[k] != 0) & (b[k] != 0)
                both += int(nz.sum())
                conflict += int((nz & (torch.sign(a[k]) != torch.sign(b[k]))).sum())
            signs[i, j] = conflict / both if both else 0.0
    return {"cosine": TaskVector.cosine_matrix(vectors).tolist(), "sign_conflicts": signs.tolist()}
