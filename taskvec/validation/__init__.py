"""Validate merges of a run's task vectors against predictions from the base model's linearisation.

:func:`validate_run` runs five phases, each a function with its own typed result (testable alone):

1. **eigenspaces** (:func:`~taskvec.validation.eigen.eigenspace_phase`): each task's eNTK at θ0 on its
   kernel inputs, its top-r eigenspace mapped to parameter space once (V = Jᵀ U Σ⁻¹), the tasks'
   eigenspace overlaps, where each task vector lives in them, and the NTK-aware merge directions;
2. **predictions** (:func:`~taskvec.validation.predict.derivative_phase`): one batched JVP per task along
   every τ_t (every task-arithmetic coefficient setting follows), first and second order along every other
   merge's direction; :class:`~taskvec.validation.predict.Scorer` turns them into predicted accuracies with
   the trust band (:func:`taskvec.interference.trust_band`);
3. **measurements** (:mod:`~taskvec.validation.measure`): every merge built in memory and evaluated on every
   task with its own head; the interference matrix and the disentanglement error ξ of every pair;
4. **coefficients** (:func:`~taskvec.validation.coefficients.coefficient_phase`): the measured λ grid
   against coefficients chosen from predictions alone, and the NTK-aware merges at the chosen λ;
5. **summary** (:func:`~taskvec.validation.summary.summarize`): Spearman, errors of trusted and flagged
   predictions, the calibration table — a pure function of the saved rows.

Everything is read through :class:`taskvec.runs.Run`; the result is plain JSON
(``RUN/validation/results.json``), drawn by :mod:`taskvec.report`. Definitions: ``../shared/THEORY.md``
("Linearised predictions", "Eigenspaces and overlaps").
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path

from ..errors import TaskvecError
from ..io import check_output, write_json
from ..linearize import parse_budget
from ..merge.memory import MergeSpec, merge_vectors
from ..runs import device_of, open_run
from .coefficients import choose_coefficients, coefficient_phase
from .context import Context, load_context
from .costs import Ledger, prediction_cost
from .eigen import EigenPhase, eigenspace_phase
from .heldout import holdout_phase
from .measure import interference_phase, measure_merges, measure_singles, predict_and_measure
from .predict import Derivatives, Scorer, derivative_phase
from .summary import summarize, weight_space

log = logging.getLogger(__name__)

DEFAULT_MERGES = [
    MergeSpec("task_arithmetic λ=0.5", "task_arithmetic", {"lambda": 0.5}),
    MergeSpec("task_arithmetic λ=1", "task_arithmetic", {"lambda": 1.0}),
    MergeSpec("ties d=0.2", "ties", {"density": 0.2, "lambda": 1.0}),
    MergeSpec("tsv", "tsv", {"lambda": 1.0}),
]
DEFAULT_LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2]

__all__ = ["DEFAULT_LAMBDAS", "DEFAULT_MERGES", "Context", "Derivatives", "EigenPhase", "MergeSpec", "Scorer",
           "Ledger", "ValidationResult", "choose_coefficients", "coefficient_phase", "derivative_phase",
           "eigenspace_phase", "holdout_phase", "interference_phase", "load_context", "measure_merges", "measure_singles",
           "summarize", "validate_run", "weight_space"]


class ValidationResult(dict):
    """The results of :func:`validate_run` (a plain dict, as saved in ``results.json``) that shows a
    summary, not a dump, in a REPL or notebook."""

    def _lines(self) -> list[tuple[str, str]]:
        s = self.get("summary", {})

        def f(x, fmt="{:.3f}"):
            return "—" if x is None else fmt.format(x)

        c = self.get("coefficients", {})
        return [("tasks", ", ".join(self.get("tasks", []))), ("predictions", str(s.get("n_predictions"))),
                ("Spearman (accuracy change)", f(s.get("spearman_change"))),
                ("MAE (points)", f(s.get("mae_points"), "{:.2f}")),
                ("trusted", f"{s.get('n_trusted')} (MAE {f(s.get('mae_points_trusted'), '{:.2f}')} points)"),
                ("flagged", f"{s.get('n_untrusted')} (MAE {f(s.get('mae_points_untrusted'), '{:.2f}')} points)"),
                ("interference Spearman", f(s.get("interference_spearman"))),
                ("λ* from predictions", f(c.get("lambda_star"), "{:g}")),
                *([("held-out Spearman", f(s["heldout"].get("spearman_change"))),
                   ("held-out trusted MAE", f(s["heldout"].get("mae_points_trusted"), "{:.2f}"))]
                  if s.get("heldout") else []),
                ("wall time (s)", f(self.get("wall_time_s"), "{:.0f}"))]

    def __repr__(self) -> str:
        return "ValidationResult(" + ", ".join(f"{k}: {v}" for k, v in self._lines()) + ")"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                       for k, v in self._lines())
        return f"<table><caption>taskvec validation</caption>{rows}</table>"


def default_probe_size(n_eval: int) -> int:
    """Probe examples per task: a fifth of the evaluation subset, at most 100 (analysis/beyond_linear.py)."""
    return min(100, max(1, n_eval // 5))


def _probe_size(n_probe: int | None, n_eval: int) -> int:
    n_probe = default_probe_size(n_eval) if n_probe is None else int(n_probe)
    if n_probe < 0:
        raise TaskvecError(f"n_probe must be ≥ 0, got {n_probe}")
    return n_probe


def _compute(ctx: Context, coefficients: dict) -> dict:
    """``results["compute"]``: the ledger, what predicting cost (derivatives + probes), the λ grid's cost and
    what knowing every predicted merge by measurement costs (each is measured once: 1 FPE)."""
    compute = ctx.ledger.to_json()
    compute["prediction_fpe"] = prediction_cost(compute, ("predictions", "probes"))
    compute["grid_fpe"] = float(coefficients["grid_evaluations"])
    compute["measure_all_fpe"] = float(ctx.evaluations)
    return compute


def _merge_delta(ctx: Context, tvs: list, m: MergeSpec) -> dict:
    """The merged delta of one configured merge, in memory; data-aware methods (``fisher``, ``regmean``) take
    their statistics from the run's tasks, as ``taskvec merge`` with ``run:`` does."""
    from ..merge.data_aware import is_data_aware, merge_run_vectors

    if is_data_aware(m.method):
        return merge_run_vectors(ctx.run, tvs, m.method, ctx.base_state, ctx.names, ctx.device, **m.params)
    return merge_vectors(tvs, m.method, ctx.base_state, **m.params)


def _second_order_directions(ctx: Context, merges: list, merge_deltas: dict, directions: dict) -> dict:
    """Directions that get their own first and second order: Σ τ, each non-task-arithmetic merge, and the
    NTK-aware sums."""
    dirs = {"sum": ctx.sum_tau}
    for m in merges:
        if m.method != "task_arithmetic" and m.name in merge_deltas:
            dirs[m.name] = merge_deltas[m.name]
    dirs.update(directions)
    return dirs


def _ntk_aware_merges(ctx: Context, der: Derivatives, scorer: Scorer, eig: EigenPhase, lam: float,
                      built: dict) -> list:
    """The NTK-aware merges at λ (and task arithmetic at the same λ, to compare), predicted and measured;
    ``built`` receives their deltas."""
    from .context import scale_deltas

    out = []
    for name, method in (("ntk_sum", "ntk_aware"), ("ntk_harm_sum", "ntk_aware_harmful")):
        delta = scale_deltas(eig.directions[name], lam)
        per = predict_and_measure(ctx, scorer, der.merge_terms(name, lam), delta)
        out.append({"name": f"{method} λ={lam:g}", "method": method, "params": {"lambda": lam}, "per_task": per})
        built[out[-1]["name"]] = delta
    delta = scale_deltas(ctx.sum_tau, lam)
    per = predict_and_measure(ctx, scorer, der.ta_terms({t: lam for t in ctx.names}), delta)
    out.append({"name": f"task_arithmetic λ={lam:g}", "method": "task_arithmetic", "params": {"lambda": lam},
                "per_task": per})
    built[out[-1]["name"]] = delta
    return out


def validate_run(run, merges: list[MergeSpec] | None = None, n_eval: int = 500, n_kernel: int = 128,
                 rank: int = 20, lambdas: list[float] | None = None, second_order: bool = True,
                 max_uncertainty: float = 1.0, ntk_aware: bool = True, device: str | None = None,
                 out: str | Path | None = None, progress: bool = True, overwrite: bool = False,
                 n_holdout: int | None = None, max_memory: int | float | str | None = None,
                 n_probe: int | None = None, probe_max_uncertainty: float = 3.0,
                 precision: str = "float64") -> ValidationResult:
    """Predict, measure and explain merges of a run's task vectors; write ``RUN/validation/results.json``.

    Args:
        run: a run directory (or :class:`~taskvec.runs.Run`) with fine-tuned tasks and their task vectors.
        merges: merges to predict and measure (default :data:`DEFAULT_MERGES`).
        n_eval: evaluation examples per task (a seeded subset of its test split, :meth:`Run.sample`).
        n_kernel: training examples per task for the eNTK eigenspaces.
        rank: r of the top-r eigenspaces.
        lambdas: the global-λ grid of the grid-search baseline (task arithmetic).
        second_order: add the second-order term ½·D²f[Δ, Δ] along each merge direction (float64 central
            differences; see :func:`taskvec.linearize.directional_outputs`).
        max_uncertainty: the trust threshold, in accuracy points (see :func:`taskvec.interference.trust_band`;
            first-order-only predictions are all untrusted).
        ntk_aware: also build, predict and measure the NTK-aware merges ``ntk_aware`` and
            ``ntk_aware_harmful`` at the prediction-chosen λ.
        out: the results file (default ``RUN/validation/results.json``); refused when it exists unless
            ``overwrite``.
        n_holdout: held-out test examples per task, disjoint from the evaluation subset, on which every
            claim is checked again (:mod:`~taskvec.validation.heldout`); default ``n_eval``; 0 skips it.
        max_memory: memory budget of the batched JVPs (bytes or ``"4GB"``; default 40% of available RAM /
            60% of free GPU memory; :func:`taskvec.linearize.jvp_many`). Config key ``validate.max_memory``.
        n_probe: evaluation examples per task on which a merge whose Taylor prediction is flagged is measured
            before the full measurement, to calibrate the expansion there (:mod:`~taskvec.validation.probe`);
            default :func:`default_probe_size` (a fifth of ``n_eval``, at most 100); 0: Taylor only.
        probe_max_uncertainty: trust threshold of the probe-calibrated predictions, in accuracy points (their
            uncertainty is two standard errors of a sampling estimate, not the Taylor band's share of flippable
            examples: its own threshold).
        precision: of the finite differences of the predictions, ``"float64"`` (default) or ``"float32"``
            (half the cost; see :func:`~taskvec.validation.predict.derivative_phase`).
    """
    t_start = time.time()
    if max_memory is not None:
        parse_budget(max_memory)  # a bad budget is refused before anything runs
    run = open_run(run, require="vectors")
    out = Path(out) if out else run.stage_dir("validate") / "results.json"
    check_output(out, overwrite)
    merges = list(DEFAULT_MERGES if merges is None else merges)
    lambdas = list(DEFAULT_LAMBDAS if lambdas is None else lambdas)
    bad = [m.name for m in merges if m.method in ("ntk_aware", "ntk_aware_harmful")]
    if bad and not ntk_aware:
        raise TaskvecError(f"merges {bad} are NTK-aware: they are built from the eigenspaces, at the "
                           "prediction-chosen λ; drop them or keep ntk_aware=True")
    merges = [m for m in merges if m.name not in bad]  # built at the prediction-chosen λ below
    device = device_of(device)
    n_probe = _probe_size(n_probe, n_eval)
    ctx = load_context(run, n_eval, n_kernel, device, n_eval if n_holdout is None else n_holdout, n_probe)
    tvs = [ctx.vectors[t] for t in ctx.names]
    led = ctx.ledger
    with led.phase("merge_directions"):  # every configured merge built in memory (fisher/regmean: + statistics)
        merge_deltas = {m.name: _merge_delta(ctx, tvs, m) for m in merges}
    with led.phase("eigenspaces"):
        eig = eigenspace_phase(ctx, rank, n_kernel, ntk_aware, progress)
    with led.phase("predictions"):
        der = derivative_phase(ctx, _second_order_directions(ctx, merges, merge_deltas, eig.directions),
                               second_order, progress, max_memory=max_memory, precision=precision)
    tick = time.time()
    scorer = Scorer.from_derivatives(der, max_uncertainty, probe_max_uncertainty)
    with led.phase("singles"):
        singles = measure_singles(ctx, scorer, progress)
    built: dict = {}
    with led.phase("merges"):
        merge_results = measure_merges(ctx, der, scorer, merges, merge_deltas, progress, built=built)
    with led.phase("interference"):
        inter = interference_phase(ctx, der, scorer, singles)
    with led.phase("coefficients"):
        coefficients = coefficient_phase(ctx, der, scorer, lambdas, progress)
    if ntk_aware:
        with led.phase("ntk_aware_merges"):
            merge_results += _ntk_aware_merges(ctx, der, scorer, eig, coefficients["lambda_star"], built)
    timings = {"eigenspaces": eig.bases_seconds, "eigen_total": eig.seconds, "predictions": der.seconds,
               "measurements_and_search": time.time() - tick}
    summary = summarize(merge_results, second_order, max_uncertainty, inter["I_pred"], inter["I_meas"])
    tick = time.time()
    with led.phase("heldout"):
        heldout = holdout_phase(ctx, merge_results, built, coefficients, progress)
    if heldout is not None:
        summary["heldout"] = heldout
        timings["heldout"] = time.time() - tick
    compute = _compute(ctx, coefficients)
    results = ValidationResult({
        "run": str(run.root), "tasks": ctx.names, "n_eval": {s: len(ctx.eval_batches[s].indices) for s in ctx.names},
        "device": str(device), "second_order": second_order, "n_probe": n_probe, "probe_max_uncertainty": probe_max_uncertainty,
        "precision": precision,
        "base_accuracy": scorer.base_acc, "finetuned_accuracy": dict(scorer.ft_acc),
        "finetuned_accuracy_full_test": {t: run.task(t).log.get("test_accuracy") for t in ctx.names},
        "merges": merge_results, "summary": summary, "interference": inter["interference"],
        "disentanglement": inter["disentanglement"], "coefficients": coefficients, "eigen": eig.info,
        "weight_space": weight_space(tvs), "evaluations": ctx.evaluations,
        "heldout_evaluations": ctx.holdout_evaluations, "timings_s": timings, "compute": compute,
        "wall_time_s": time.time() - t_start,
    })
    write_json(out, results, overwrite=True)
    return results
