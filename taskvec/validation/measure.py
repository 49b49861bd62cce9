"""Phase 3: build each merge once (in memory, on the shared backbone), evaluate every task with its own
head, and score the predictions; the interference matrix and the disentanglement error of every pair."""

from __future__ import annotations

import numpy as np
import torch

from ..linearize import accuracy
from .context import Context, add_deltas, scale_deltas
from .predict import Derivatives, Scorer


def xi(f_single: list[torch.Tensor], f_joint: list[torch.Tensor]) -> float:
    """Disentanglement error of a pair: Σ_t mean 1{argmax f_single_t ≠ argmax f_joint_t} over the two tasks
    (Ortiz-Jimenez et al.)."""
    return float(sum((a.argmax(-1) != b.argmax(-1)).float().mean() for a, b in zip(f_single, f_joint)))


def measure_singles(ctx: Context, scorer: Scorer, progress: bool = True) -> dict[str, dict]:
    """Every single-task model θ0 + τ_t measured on every task; fills ``scorer.ft_acc`` (the fine-tuned
    accuracy of each task on its evaluation subset). Returns ``{t: {s: logits}}``."""
    from tqdm.auto import tqdm

    singles = {t: ctx.measure(ctx.vectors[t].deltas)
               for t in tqdm(ctx.names, desc="single-task models", disable=not progress)}
    scorer.ft_acc.update({s: accuracy(singles[s][s], scorer.labels[s]) for s in ctx.names})
    return singles


def predict_and_measure(ctx: Context, scorer: Scorer, terms: tuple, delta: dict) -> dict:
    """One merge θ0 + ``delta`` predicted from its Taylor ``terms`` (J·Δ, ½D²f), probed where the trust band
    flags the expansion (before the full measurement: :meth:`Context.measure_probe`), measured, and scored:
    ``{task: entry}`` (:meth:`Scorer.record`)."""
    probes = ctx.measure_probe(delta, scorer.flagged(*terms)) if ctx.probe_batches else None
    return scorer.record(*terms, ctx.measure(delta), probes)


def measure_merges(ctx: Context, der: Derivatives, scorer: Scorer, merges: list, merge_deltas: dict,
                   progress: bool = True, built: dict | None = None) -> list[dict]:
    """Predicted vs measured for each configured merge: ``[{name, method, params, per_task}]``.

    Global-λ task arithmetic is predicted from the τ directions; every other merge from its own
    direction ``merge_deltas[name]``. ``built`` (if given) receives ``{name: Δ}`` of every merge measured.
    """
    from tqdm.auto import tqdm

    out = []
    for m in tqdm(merges, desc="merges", disable=not progress):
        if m.method == "task_arithmetic" and not set(m.params) - {"lambda"}:
            lam = float(m.params.get("lambda", 1.0))
            terms = der.ta_terms({t: lam for t in ctx.names})
            delta = scale_deltas(ctx.sum_tau, lam)
        else:
            delta = merge_deltas[m.name]
            terms = der.merge_terms(m.name)
        if built is not None:
            built[m.name] = delta
        out.append({"name": m.name, "method": m.method, "params": m.params,
                    "per_task": predict_and_measure(ctx, scorer, terms, delta)})
    return out


def interference_phase(ctx: Context, der: Derivatives, scorer: Scorer, singles: dict) -> dict:
    """``I[s, t]``: accuracy change of task s caused by τ_t alone, predicted (first order) and measured;
    and ξ of every pair (one more full evaluation per pair).

    Returns ``{"interference": {"predicted", "measured"} (T × T lists), "disentanglement": [...],
    "I_pred", "I_meas" (arrays)}``.
    """
    names, D, T = ctx.names, der.D, len(ctx.names)
    I_pred, I_meas = np.zeros((T, T)), np.zeros((T, T))
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            I_pred[i, j] = accuracy(D[s].predict({f"tau:{t}": 1.0}), D[s].labels) - scorer.base_acc[s]
            I_meas[i, j] = accuracy(singles[t][s], D[s].labels) - scorer.base_acc[s]
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            joint = ctx.measure(add_deltas(ctx.vectors[a].deltas, ctx.vectors[b].deltas))
            pa, pb = D[a].predict({f"tau:{a}": 1.0}), D[b].predict({f"tau:{b}": 1.0})
            both = {f"tau:{a}": 1.0, f"tau:{b}": 1.0}
            ja, jb = D[a].predict(both), D[b].predict(both)
            pairs.append({"pair": [a, b], "predicted": xi([pa, pb], [ja, jb]),
                          "measured": xi([singles[a][a], singles[b][b]], [joint[a], joint[b]])})
    return {"interference": {"predicted": I_pred.tolist(), "measured": I_meas.tolist()},
            "disentanglement": pairs, "I_pred": I_pred, "I_meas": I_meas}
