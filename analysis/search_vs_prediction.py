"""Choosing per-task merge coefficients from predictions vs searching for them by measurement, at equal compute.

For one taskvec run (default: ``runs/default``), over the same space — task arithmetic θ0 + Σ_t c_t·τ_t with
every c_t in [0.05, 2] — three ways of choosing the coefficients:

* **prediction**: the linearised model's predictions (one batched JVP along the τ's per task and the
  second-order term along Σ τ: :func:`taskvec.validation.derivative_phase`), maximised by
  :func:`taskvec.validation.choose_coefficients`; its cost is what that phase takes;
* **random search**: coefficients drawn uniformly from the box, each measured (one full evaluation);
* **CMA-ES** (the ``cma`` package, the optimiser mergekit-evolve uses): each candidate measured.

Compute is counted in forward-pass equivalents (FPE, :mod:`taskvec.validation.costs`): one full evaluation
of a merged model on every task's evaluation examples = 1; the prediction's cost is its seconds divided by
the median seconds of this run's own evaluations (by time, so a float64 forward or a JVP costs what it
costs). The searches get budgets of 1×, 2×, 5× and 10× the prediction's cost; the measured objective of all
three is the average normalised accuracy on the evaluation subset (normalised by the fine-tuned models'
accuracies there, measured once and shared by every method: T evaluations not charged to anyone). Every
choice is then scored on a **held-out** subset of the test split that neither side saw. The searches are
repeated over ``--seeds`` seeds (mean and spread reported), and the global-λ grid of the validate stage (10
evaluations) is shown beside them.

    .venv/bin/python analysis/search_vs_prediction.py --run runs/default --n-eval 100 --seeds 3

Writes ``analysis/results/search_vs_prediction_<name>.{md,json,png}``. Needs ``pip install cma``
(``pip install -e '.[analysis]'``).
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

from taskvec.linearize import accuracy
from taskvec.runs import device_of, open_run
from taskvec.validation import Scorer, choose_coefficients, derivative_phase, load_context

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH = 0.05, 2.0  # the coefficient box of every method
FACTORS = (1, 2, 5, 10)
GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2]  # the validate stage's measured λ grid


class Objective:
    """Average normalised accuracy of θ0 + Σ c_t τ_t, measured (1 FPE each on the evaluation subset; cached
    per coefficient vector) or on the held-out subset (not charged: it scores choices, it does not make them)."""

    def __init__(self, ctx):
        self.ctx, self.names = ctx, ctx.names
        self.labels = {s: torch.cat([b["labels"] for b in ctx.eval_batches[s]]) for s in ctx.names}
        self.h_labels = {s: torch.cat([b["labels"] for b in ctx.holdout_batches[s]]) for s in ctx.names}
        self.ft = {s: accuracy(ctx.measure(ctx.vectors[s].deltas, tasks=[s])[s], self.labels[s]) for s in ctx.names}
        self.ft_h = {s: accuracy(ctx.measure(ctx.vectors[s].deltas, holdout=True, tasks=[s])[s], self.h_labels[s])
                     for s in ctx.names}
        self.evaluations = 0
        self._held: dict[tuple, float] = {}

    def delta(self, c) -> dict:
        return self.ctx.combination({t: float(c[i]) for i, t in enumerate(self.names)})

    def measured(self, c) -> float:
        self.evaluations += 1
        f = self.ctx.measure(self.delta(c))
        return float(np.mean([accuracy(f[s], self.labels[s]) / self.ft[s] for s in self.names]))

    def heldout(self, c) -> float:
        key = tuple(round(float(x), 6) for x in c)
        if key not in self._held:
            f = self.ctx.measure(self.delta(c), holdout=True)
            self._held[key] = float(np.mean([accuracy(f[s], self.h_labels[s]) / self.ft_h[s] for s in self.names]))
        return self._held[key]


def predicted_choice(ctx, obj: Objective) -> tuple[list[float], float]:
    """The prediction-chosen coefficients and the seconds their predictions took."""
    tick = time.perf_counter()
    der = derivative_phase(ctx, {"sum": ctx.sum_tau}, second_order=True, progress=False)
    scorer = Scorer.from_derivatives(der, 1.0)
    scorer.ft_acc.update(obj.ft)
    _, coefs = choose_coefficients(lambda cf: scorer.predicted_avg(*der.ta_terms(cf)), ctx.names)
    return [coefs[t] for t in ctx.names], time.perf_counter() - tick


def random_search(obj: Objective, budget: int, seed: int) -> list[tuple[float, list[float]]]:
    """Best-so-far ``(measured, coefficients)`` after each of ``budget`` uniform draws from the box."""
    rng = np.random.default_rng(seed)
    best, trace = (-math.inf, None), []
    for _ in range(budget):
        c = rng.uniform(LOW, HIGH, len(obj.names)).tolist()
        v = obj.measured(c)
        best = max(best, (v, c), key=lambda b: b[0])
        trace.append(best)
    return trace


def cma_search(obj: Objective, budget: int, seed: int, x0: float = 0.5, sigma0: float = 0.3):
    """Best-so-far after each of ``budget`` CMA-ES evaluations (maximising; start x0·1, step sigma0, bounded)."""
    import cma

    es = cma.CMAEvolutionStrategy([x0] * len(obj.names), sigma0,
                                  {"bounds": [LOW, HIGH], "seed": seed + 1, "verbose": -9})
    best, trace = (-math.inf, None), []
    while len(trace) < budget:
        xs = es.ask()
        vals = []
        for x in xs:
            if len(trace) >= budget:
                break
            v = obj.measured(list(map(float, x)))
            vals.append(-v)
            best = max(best, (v, list(map(float, x))), key=lambda b: b[0])
            trace.append(best)
        if len(vals) == len(xs):
            es.tell(xs, vals)
    return trace


def _table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default")
    p.add_argument("--name", default=None, help="results name (default: the run directory's name)")
    p.add_argument("--n-eval", type=int, default=100, help="evaluation examples per task")
    p.add_argument("--n-holdout", type=int, default=250, help="held-out test examples per task")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--factors", type=float, nargs="+", default=list(FACTORS),
                   help="search budgets as multiples of the prediction's cost")
    p.add_argument("--max-evaluations", type=int, default=None, help="cap every budget (a quick look)")
    p.add_argument("--results-dir", default=str(ROOT / "analysis" / "results"))
    p.add_argument("--readme", action="store_true", help="replace README.md's search-<name> section with the table")
    a = p.parse_args(argv)
    try:
        import cma  # noqa: F401
    except ImportError:
        sys.exit("this study needs the cma package: pip install cma (or pip install -e '.[analysis]')")
    run = open_run(a.run, require="vectors")
    ctx = load_context(run, a.n_eval, 8, device_of(a.device), a.n_holdout)
    if not ctx.holdout_batches:
        sys.exit(f"{run.root}: the test split has no examples beyond the {a.n_eval} evaluation ones to hold out")
    obj = Objective(ctx)
    pred_c, pred_s = predicted_choice(ctx, obj)
    grid = [(obj.measured([lam] * len(ctx.names)), [lam] * len(ctx.names)) for lam in GRID]
    fpe_s = float(np.median(ctx.ledger.measure_seconds))  # seconds of one full evaluation, this run
    pred_fpe = pred_s / fpe_s
    factors = list(a.factors)
    budgets = [max(1, min(round(f * pred_fpe), a.max_evaluations or math.inf)) for f in factors]
    traces = {"random search": [random_search(obj, budgets[-1], s) for s in range(a.seeds)],
              "CMA-ES": [cma_search(obj, budgets[-1], s) for s in range(a.seeds)]}
    pred_h = obj.heldout(pred_c)
    grid_best = max(grid, key=lambda g: g[0])
    rows, curves = [], {}
    for method, runs in traces.items():
        dense = sorted(set(np.unique(np.geomspace(1, budgets[-1], 8).round().astype(int)).tolist() + budgets))
        curves[method] = {b: [obj.heldout(tr[b - 1][1]) for tr in runs] for b in dense}
    for f, b in zip(factors, budgets):
        cells = [f"{f:g}× ({b} evaluations)"]
        for method in traces:
            h = curves[method][b]
            cells.append(f"{100 * np.mean(h):.2f} ± {100 * np.std(h):.2f}")
        rows.append(cells)
    match = {}
    for method, cur in curves.items():
        hit = [b for b in sorted(cur) if np.mean(cur[b]) >= pred_h]
        match[method] = hit[0] if hit else None
    name = a.name or Path(a.run).name
    hw = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        f"Measured by `python analysis/search_vs_prediction.py --run {a.run} --n-eval {a.n_eval} --n-holdout "
        f"{a.n_holdout} --seeds {a.seeds}` on {hw}, torch {torch.__version__}. Tasks: {', '.join(ctx.names)}; "
        f"coefficients c_t ∈ [{LOW}, {HIGH}] per task; one evaluation (1 FPE) = {fpe_s:.2f} s here.",
        "",
        f"**Prediction-chosen coefficients** ({', '.join(f'{c:g}' for c in pred_c)}): cost "
        f"**{pred_fpe:.1f} FPE** ({pred_s:.1f} s), held-out avg normalised accuracy **{100 * pred_h:.2f}%**. "
        f"Measured global-λ grid (10 FPE): λ={grid_best[1][0]:g}, held-out {100 * obj.heldout(grid_best[1]):.2f}%.",
        "",
        "Held-out avg normalised accuracy (%) of the best measured choice at each budget (mean ± sd over "
        f"{a.seeds} seeds):",
        "",
        _table(rows, ["budget (× the prediction's cost)", *traces]),
        "",
        "Compute the measured searches need for their mean held-out score to reach the prediction's: "
        + "; ".join(f"{m}: " + (f"{b} FPE = {b / pred_fpe:.1f}× the prediction's cost" if b else
                                f"not reached within {budgets[-1]} FPE ({factors[-1]:g}×)") for m, b in match.items())
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    res_dir = Path(a.results_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    data = {"run": str(run.root), "tasks": ctx.names, "n_eval": a.n_eval, "n_holdout": a.n_holdout,
            "seconds_per_fpe": fpe_s, "prediction": {"coefficients": pred_c, "seconds": pred_s, "fpe": pred_fpe,
                                                     "heldout": pred_h},
            "grid": [{"lambda": g[1][0], "measured": g[0], "heldout": obj.heldout(g[1])} for g in grid],
            "budgets": {f"{f:g}": b for f, b in zip(factors, budgets)},
            "curves": {m: {str(b): v for b, v in c.items()} for m, c in curves.items()},
            "match_fpe": match, "evaluations": obj.evaluations}
    (res_dir / f"search_vs_prediction_{name}.json").write_text(json.dumps(data, indent=1))
    (res_dir / f"search_vs_prediction_{name}.md").write_text(text)
    _plot(curves, pred_fpe, pred_h, obj.heldout(grid_best[1]), res_dir / f"search_vs_prediction_{name}.png", name)
    if a.readme:
        from taskvec.io import replace_marked_section

        replace_marked_section(ROOT / "README.md", f"search-{name}",
                               text + f"\n![quality vs compute](analysis/results/search_vs_prediction_{name}.png)\n")
    return 0


def _plot(curves, pred_fpe, pred_h, grid_h, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, cur in curves.items():
        bs = sorted(cur)
        m = np.array([np.mean(cur[b]) for b in bs]) * 100
        s = np.array([np.std(cur[b]) for b in bs]) * 100
        ax.plot(bs, m, label=method)
        ax.fill_between(bs, m - s, m + s, alpha=0.2)
    ax.scatter([pred_fpe], [100 * pred_h], color="k", zorder=5, label="prediction-chosen")
    ax.scatter([10], [100 * grid_h], marker="s", color="tab:green", zorder=5, label="global-λ grid (10)")
    ax.set_xscale("log")
    ax.set_xlabel("compute (forward-pass equivalents)")
    ax.set_ylabel("held-out avg normalised accuracy (%)")
    ax.set_title(f"choosing merge coefficients: {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
