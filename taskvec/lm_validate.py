"""Predict and measure merges of a run's causal-LM tasks in the LM metric (mean NLL, nats per token).

``validate_lm_run(RUN)`` is the LM counterpart of :func:`taskvec.validation.validate_run` for runs whose
tasks were fine-tuned with an LM objective (``HeadSpec.kind == "lm"``, :mod:`taskvec.lm_objective`). Per
task s, on ``n_eval`` seeded test examples (:meth:`taskvec.runs.Run.sample`), at θ0:

* the next-token logits' JVPs along every task vector and the merged directions (one batched JVP,
  memory-bounded) and their second directional derivatives along Σ τ and every other merge's own direction
  (:func:`taskvec.lm_predict.lm_expansions`);
* predicted change of the mean NLL for each merge (task arithmetic at every λ of ``lambdas`` along λ·Σ τ,
  other methods along their merged delta) by two predictors, both reported: ``logits`` (the default
  headline) computes the NLL from the linearised logits z0 + λ·J_z·Στ + λ²·½D²z — the linearised model —
  with its trust band from the neglected next term (:func:`taskvec.lm_predict.logit_trust_band`);
  ``loglik`` expands the log-likelihood itself, ℓ0 + λ·Jℓ·Στ + λ²·½D²ℓ
  (:func:`taskvec.lm_predict.trust_band_nats`); both bands in nats per token;
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
from .lm_choices import ChoiceCheck, choice_summary
from .lm_objective import LMBatches, resolve_objective
from .lm_probe import probe_nll_change, probe_positions
from .lm_predict import lm_expansions, logit_trust_band, mean_nll_change, measured_logliks, trust_band_nats
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


def _objective(run, name: str) -> str:
    rt = run.task(name)
    if rt.head is None or rt.head.kind != "lm":
        raise TaskvecError(f"task {name!r} of {run.root} has a {getattr(rt.head, 'kind', None)!r} head, not an LM "
                           "head: validate_lm_run needs LM tasks (objective lm or choice); use taskvec validate")
    return resolve_objective((rt.log.get("config") or {}).get("objective", "auto"), rt.task)


def _lm_batches(run, name: str, indices, batch_size: int) -> LMBatches:
    rt = run.task(name)
    return LMBatches(run.tokenizer(), rt.task, indices, _objective(run, name), batch_size=batch_size,
                     max_length=rt.max_length, sort_by_length=True)


def _calibration(rows: list[dict], key: str) -> list[dict]:
    out = []
    for u in CALIBRATION:
        sel = [r for r in rows if r["uncertainty"] <= u and (r["curvature"] < 1 or r["predictor"] == "probe")]
        errs = [abs(r["predicted"] - r[key]) for r in sel]
        out.append({"max_uncertainty": u, "n": len(errs), "mean_abs_error": float(np.mean(errs)) if errs else None,
                    "max_abs_error": float(np.max(errs)) if errs else None,
                    "coverage": float(np.mean([e <= r["uncertainty"] for e, r in zip(errs, sel)])) if errs else None})
    return out


def _summary(rows: list[dict], max_uncertainty: float) -> dict:
    s: dict = {"n_predictions": len(rows)}
    for where, key in (("eval", "measured"), ("heldout", "measured_heldout")):
        trusted = [abs(r["predicted"] - r[key]) for r in rows if r["trusted"]]
        flagged = [abs(r["predicted"] - r[key]) for r in rows if not r["trusted"]]
        s[where] = {"spearman": _spearman([r["predicted"] for r in rows], [r[key] for r in rows]),
                    "spearman_1st": _spearman([r["predicted_1st"] for r in rows], [r[key] for r in rows]),
                    **{f"spearman_{p}{o}": _spearman([r[f"predicted_{p}{o}"] for r in rows], [r[key] for r in rows])
                       for p in PREDICTORS for o in ("", "_1st", "_2nd")},
                    **{f"mae_{p}": float(np.mean([abs(r[f"predicted_{p}"] - r[key]) for r in rows]))
                       for p in PREDICTORS},
                    "mae_all": float(np.mean([abs(r["predicted"] - r[key]) for r in rows])),
                    "mae_no_change": float(np.mean([abs(r[key]) for r in rows])),
                    "mae_trusted": float(np.mean(trusted)) if trusted else None, "n_trusted": len(trusted),
                    "mae_flagged": float(np.mean(flagged)) if flagged else None,
                    "calibration": _calibration(rows, key)}
    for where, key in (("eval", "measured"), ("heldout", "measured_heldout")):
        s[where]["spearman_taylor"] = _spearman([r["predicted_taylor"] for r in rows], [r[key] for r in rows])
        s[where]["mae_taylor"] = float(np.mean([abs(r["predicted_taylor"] - r[key]) for r in rows]))
    s["n_probed"] = sum(r["predictor"] == "probe" for r in rows)
    s["n_probe_checked"] = sum(r["predictor"] == "probe_check" for r in rows)
    s["max_uncertainty"] = max_uncertainty
    return s


PREDICTORS = ("logits", "loglik")


def _combinations(lambdas, others, names) -> dict[str, dict[str, float]]:
    """Every combination of directions the validation predicts: task arithmetic at each λ (``ta:λ``), the other
    merges (``name``), each task vector alone (``tau:t``, the interference matrix) and the λ grid (``grid:λ``)."""
    combos = {f"ta:{lam:g}": {"sum": lam} for lam in lambdas}
    combos.update({name: {name: 1.0} for name in others})
    combos.update({f"tau:{t}": {f"tau:{t}": 1.0} for t in names})
    combos.update({f"grid:{lam:g}": {"sum": lam} for lam in LAMBDA_GRID})
    return combos


class _Predicted:
    """One task's predictions, in mean-NLL change (nats per token), by either predictor."""

    def __init__(self, der, pred, combos, predictor: str, max_uncertainty: float):
        self.der, self.pred, self.combos = der, pred, combos
        self.predictor, self.max_uncertainty = predictor, max_uncertainty

    def loglik_band(self, combo: str) -> dict:
        D = self.der
        first = sum(c * D.first[d] for d, c in self.combos[combo].items())
        second = all(d in D.half_second for d in self.combos[combo])
        half = (sum(c * c * D.half_second[d] for d, c in self.combos[combo].items()) if second
                else torch.zeros_like(first))
        band = trust_band_nats(first, half, D.n_tokens, self.max_uncertainty)
        if not second:
            band.update(curvature=float("inf"), uncertainty=float("inf"), trusted=False)
        return band

    def bands(self, combo: str) -> dict:
        """Both predictors' bands. A diverging series (ρ ≥ 1) is truncated at its first order, the smallest
        term (``order`` 1; ``predicted_change_2nd`` keeps the second-order value)."""
        out = {"loglik": self.loglik_band(combo),
               "logits": logit_trust_band(self.pred, combo, self.der.f0, self.der.n_tokens, self.max_uncertainty)}
        for b in out.values():
            b["predicted_change_2nd"] = b["predicted_change"]
            b["order"] = 2 if b["curvature"] < 1 else 1
            if b["order"] == 1:
                b["predicted_change"] = b["predicted_change_1st"]
        return out

    def taylor_terms(self, combo: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(J·Δ, ½D²ℓ[Δ, Δ] or None)`` of the log-likelihood along the combination, ``(n,)`` nats; the
        second term is ``None`` where the series diverges (ρ ≥ 1) or was not computed."""
        D, co = self.der, self.combos[combo]
        first = sum(c * D.first[d] for d, c in co.items())
        half = sum(c * c * D.half_second[d] for d, c in co.items()) if all(d in D.half_second for d in co) else None
        if half is not None and self.loglik_band(combo)["curvature"] >= 1:
            half = None
        return first, half

    def change(self, combo: str, first_only: bool = False) -> float:
        band = self.bands(combo)[self.predictor]
        return band["predicted_change_1st" if first_only else "predicted_change"]


def _row(label: str, task: str, P: _Predicted, combo: str, measured: float, measured_heldout: float,
         probe: dict | None) -> dict:
    """One merge × task row. ``probe`` (:func:`taskvec.lm_probe.probe_nll_change`, or None): where the Taylor
    band does not trust the prediction, a converging series (ρ < 1) in which the probe finds no bias keeps
    it (``predictor: probe_check``); otherwise the probe's estimate is the headline (``predictor: probe``),
    trusted when its own uncertainty is within the threshold."""
    bands = P.bands(combo)
    b = bands[P.predictor]
    row = {"merge": label, "task": task, "base_nll": mean_nll_change(P.der.f0, P.der.n_tokens),
           "predicted": b["predicted_change"], "predicted_1st": b["predicted_change_1st"],
           "predicted_taylor": b["predicted_change"], "curvature": b["curvature"], "uncertainty": b["uncertainty"],
           "trusted": b["trusted"], "predictor": "taylor", "measured": measured, "measured_heldout": measured_heldout}
    row["order"] = b["order"]
    for name, bd in bands.items():
        for o in ("", "_1st", "_2nd"):
            row[f"predicted_{name}{o}"] = bd[f"predicted_change{o}"]
    if probe is not None and not b["trusted"]:
        row.update({f"probe_{k}": v for k, v in probe.items()})
        if b["curvature"] < 1 and probe["taylor_consistent"]:
            row["predictor"] = "probe_check"
        else:
            row.update(predictor="probe", predicted=probe["predicted"], uncertainty=probe["uncertainty"],
                       trusted=probe["uncertainty"] <= P.max_uncertainty)
    return row


class _Session:
    """The state the phases of one :func:`validate_lm_run` share: the run, one backbone every merge is applied
    to (restored exactly), each task's model, batches and predictions, the measurements of θ0."""

    def __init__(self, run, n_eval: int, n_holdout: int, batch_size: int, device):
        self.run, self.names, self.dev = run, run.names, device_of(device)
        self.vectors = run.vectors()
        self.bb = run.backbone(self.dev)
        self.models = {s: run.base_task_model(s, backbone=self.bb) for s in self.names}
        ev_idx = {s: run.sample(s, "test", n_eval) for s in self.names}
        ho_idx = {s: run.holdout(s, n_eval, n_holdout) for s in self.names}
        self.ev = {s: _lm_batches(run, s, ev_idx[s], batch_size) for s in self.names}
        self.ho = {s: _lm_batches(run, s, ho_idx[s], batch_size) for s in self.names}
        self.mc = ChoiceCheck(run.tokenizer(), {s: run.task(s).task for s in self.names
                                                if _objective(run, s) == "choice"},
                              ev_idx, ho_idx, batch_size, {s: run.task(s).max_length for s in self.names})
        self.measured_mc: dict = {}
        self.P: dict[str, _Predicted] = {}

    def directions(self, merges) -> tuple[dict, dict]:
        """``(directions, other merges' deltas)``: every task vector, their sum and each configured merge."""
        from .merge.memory import merge_vectors

        vecs = list(self.vectors.values())
        base_state = {k: p.detach().cpu() for k, p in self.bb.named_parameters()}
        self.sum_tau = merge_vectors(vecs, "task_arithmetic", base_state, **{"lambda": 1.0})
        dirs = {f"tau:{t}": self.vectors[t].deltas for t in self.names}
        dirs["sum"] = self.sum_tau
        others = {m.name: merge_vectors(vecs, m.method, base_state, **m.params) for m in merges or []}
        return {**dirs, **others}, others

    def predict(self, dirs, combos, second, rem, predictor, max_uncertainty, max_memory, progress) -> None:
        from tqdm.auto import tqdm

        for s in tqdm(self.names, desc="LM predictions", disable=not progress):
            der, pred = lm_expansions(self.models[s], self.ev[s], dirs, combos, second, rem, max_memory, self.dev)
            self.P[s] = _Predicted(der, pred, combos, predictor, max_uncertainty)
        self.mc.predict(self.models, dirs, {c: combos[c] for c in rem}, second, max_memory, self.dev)
        self.base = {s: (self.P[s].der.f0, measured_logliks(self.models[s], self.ho[s], self.dev)) for s in self.names}
        self.n_ho = {s: (self.ho[s].batch(list(range(self.ho[s].num_examples)))["labels"] != -100).sum(1)
                     for s in self.names}

    def measure(self, delta) -> dict:
        """``{task: (ℓ on the evaluation examples, ℓ on the held-out ones)}`` of θ0 + ``delta`` (and the
        multiple-choice accuracies into ``measured_mc``)."""
        with applied(self.bb, delta):
            self.measured_mc = self.mc.measure(self.models, self.dev)
            return {s: (measured_logliks(self.models[s], self.ev[s], self.dev),
                        measured_logliks(self.models[s], self.ho[s], self.dev)) for s in self.names}

    def changes(self, got) -> tuple[dict, dict]:
        """Measured mean-NLL changes ``({task: eval}, {task: held-out})`` of :meth:`measure`'s result."""
        return ({s: mean_nll_change(got[s][0] - self.base[s][0], self.P[s].der.n_tokens) for s in self.names},
                {s: mean_nll_change(got[s][1] - self.base[s][1], self.n_ho[s]) for s in self.names})

    def merge_rows(self, specs, pos, progress) -> tuple[list[dict], dict]:
        """Measure every merge ``(label, combination, delta)``: its rows (with the probe where flagged) and
        the average measured change of task arithmetic at each λ."""
        from tqdm.auto import tqdm

        rows, measured_avg = [], {}
        for label, combo, delta in tqdm(specs, desc="LM measurements", disable=not progress):
            got = self.measure(delta)
            ch, ch_ho = self.changes(got)
            for s in self.names:
                P, probe = self.P[s], None
                if len(pos[s]):
                    first, half = P.taylor_terms(combo)
                    probe = probe_nll_change(first, half, P.der.n_tokens, pos[s],
                                             (got[s][0] - self.base[s][0])[pos[s]])
                rows.append({**_row(label, s, P, combo, ch[s], ch_ho[s], probe),
                             **self.mc.fields(s, combo, self.measured_mc.get(s))})
            if combo.startswith("ta:"):
                measured_avg[P.combos[combo]["sum"]] = float(np.mean(list(ch.values())))
        return rows, measured_avg

    def interference(self) -> dict:
        """I[s, t]: τ_t alone on task s, first order vs measured."""
        names = self.names
        pred = [[self.P[s].change(f"tau:{t}", first_only=True) for t in names] for s in names]
        meas = [[0.0] * len(names) for _ in names]
        for j, t in enumerate(names):
            ch, _ = self.changes(self.measure(self.vectors[t].deltas))
            for i, s in enumerate(names):
                meas[i][j] = ch[s]
        off = [(pred[i][j], meas[i][j]) for i in range(len(names)) for j in range(len(names)) if i != j]
        return {"predicted": pred, "measured": meas,
                "spearman_offdiag": _spearman(*zip(*off)) if len(off) > 2 else None}

    def coefficients(self, predictor: str, measured_avg: dict) -> dict:
        """The global λ chosen from the predictions — only where every task's series converges (ρ < 1 of the
        headline predictor: a truncated, diverging series is linear in λ and would pick the grid's edge) —
        measured, against the measured grid's best."""
        def predicted_avg(lam):
            return float(np.mean([self.P[s].change(f"grid:{lam:g}") for s in self.names]))

        inside = [lam for lam in LAMBDA_GRID
                  if all(self.P[s].bands(f"grid:{lam:g}")[predictor]["curvature"] < 1 for s in self.names)]
        lam_star = min(inside or LAMBDA_GRID[:1], key=predicted_avg)
        ch, ch_ho = self.changes(self.measure({k: lam_star * v for k, v in self.sum_tau.items()}))
        lam_grid = min(measured_avg, key=measured_avg.get) if measured_avg else None
        return {"lambda_star": lam_star, "predicted_avg_at_lambda_star": predicted_avg(lam_star),
                "lambda_converges_up_to": max(inside) if inside else None,
                "measured_avg_at_lambda_star": {"eval": float(np.mean(list(ch.values()))),
                                                "heldout": float(np.mean(list(ch_ho.values())))},
                "grid": measured_avg, "grid_best_lambda": lam_grid, "grid_best_avg": measured_avg.get(lam_grid)}


def validate_lm_run(run, merges: list | None = None, lambdas: list[float] | None = None, n_eval: int = 60,
                    n_holdout: int | None = None, second_order: bool = True, max_uncertainty: float = 0.05,
                    predictor: str = "loglik", n_probe: int | None = None,
                    max_memory: int | float | str | None = None, batch_size: int = 16, device: str | None = None,
                    out: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Predict, measure and compare merges of an LM run in mean NLL (nats per token); see the module doc.

    ``merges``: :class:`~taskvec.merge.memory.MergeSpec` besides task arithmetic at every λ of ``lambdas``;
    ``max_uncertainty``: the trust threshold in nats per token; ``n_holdout`` default ``n_eval``;
    ``predictor``: ``loglik`` (the log-likelihood's own Taylor series) or ``logits`` (the linearised
    next-token logits, :func:`taskvec.lm_predict.lm_expansions`); both are reported, this one is the Taylor
    headline; ``n_probe``: probe examples per task (default ``n_eval // 5``, 0 = none) measured on each merge
    where the Taylor band does not trust the prediction (:mod:`taskvec.lm_probe`, :func:`_row`).
    """
    if predictor not in PREDICTORS:
        raise TaskvecError(f"predictor must be one of {', '.join(PREDICTORS)}; got {predictor!r}")
    t0 = time.time()
    run = open_run(run, require="vectors")
    out = Path(out) if out else run.stage_dir("validate") / "lm_results.json"
    check_output(out, overwrite)
    lambdas = list(DEFAULT_LAMBDAS if lambdas is None else lambdas)
    n_holdout = n_eval if n_holdout is None else n_holdout
    S = _Session(run, n_eval, n_holdout, batch_size, device)
    dirs, others = S.directions(merges)
    combos = _combinations(lambdas, others, S.names)
    rem = [c for c in combos if not c.startswith(("grid:", "tau:"))]
    S.predict(dirs, combos, ["sum", *others] if second_order else [], rem, predictor, max_uncertainty, max_memory,
              progress)
    t_pred = time.time() - t0
    specs = [(f"task_arithmetic λ={lam:g}", f"ta:{lam:g}", {k: lam * v for k, v in S.sum_tau.items()})
             for lam in lambdas]
    specs += [(name, name, d) for name, d in others.items()]
    n_probe = max(1, n_eval // 5) if n_probe is None else int(n_probe)
    pos = {s: probe_positions(len(S.base[s][0]), n_probe) if n_probe > 0 else torch.zeros(0, dtype=torch.long)
           for s in S.names}
    rows, measured_avg = S.merge_rows(specs, pos, progress)
    res = {"run": str(run.root), "tasks": S.names, "unit": "mean NLL change, nats per token (negative = better)",
           "n_eval": n_eval, "n_holdout": n_holdout, "second_order": second_order, "predictor": predictor,
           "n_probe": n_probe, "rows": rows,
           "merges": [{"name": f"task_arithmetic λ={lam:g}", "method": "task_arithmetic", "params": {"lambda": lam}}
                      for lam in lambdas] + [{"name": m.name, "method": m.method, "params": dict(m.params)}
                                             for m in merges or []],
           "summary": {**_summary(rows, max_uncertainty), "choice": choice_summary(rows)},
           "interference": S.interference(), "coefficients": S.coefficients(predictor, measured_avg),
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
    ``max_uncertainty``, ``predictor``, ``n_probe``, ``max_memory``, ``device``, ``progress``) and the
    non-task-arithmetic merges."""
    import inspect

    keys = set(inspect.signature(validate_lm_run).parameters) - {"run", "merges", "out", "overwrite"}
    kw = {k: v for k, v in section.items() if k in keys}
    res = validate_lm_run(out, merges=[m for m in merges if m.method != "task_arithmetic"], overwrite=True, **kw)
    return {"summary": res["summary"], "path": str(run_path(out)), "coefficients": res["coefficients"],
            "interference": res["interference"]}


def run_path(out) -> Path:
    return open_run(out, require="vectors").stage_dir("validate") / "lm_results.json"
