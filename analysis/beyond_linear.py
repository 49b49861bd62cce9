"""Which predictor stays useful outside the linear regime? Every candidate against measurement, one run.

For one taskvec run (default ``runs/interfering``: full scope, four tasks, merges at λ ≥ 0.5 far outside the
region where the Taylor series along the merge direction converges), every configured merge and every λ of
the validate stage's task-arithmetic grid is measured on each task's evaluation subset, and predicted by:

* ``taylor1`` / ``taylor2``: the first- and second-order expansion at θ0 (what ``taskvec validate`` reports);
* ``gated``: second order where its series ratio ρ < 1, else first order (ρ-gated choice between orders);
* ``pade``: the [1/1] Padé approximant in λ of each logit, f0 + a²/(a − b) with a = J·Δ, b = ½D²f[Δ, Δ]
  (resummation from the same two derivatives);
* ``probe0`` / ``probe1`` / ``probe2`` / ``probe1/2``: :func:`taskvec.validation.probe.probe_prediction` — the
  merged model measured on k random evaluation examples per task, the Taylor terms (none / first / first +
  second order / the second order only where its series converges, ρ < 1) calibrated there, the accuracy
  rectified by the probe's own errors — for k in ``--probe-sizes``, averaged over ``--seeds`` probe draws;
* ``hybrid``: ``taylor2`` where its own trust band trusts it, else ``probe1/2`` (what validate does); its
  unflagged predictions: the trusted Taylor ones and the probe ones with uncertainty ≤
  ``--probe-max-uncertainty``.

Compute is counted in forward-pass equivalents (FPE: one float32 forward over every task's evaluation
examples = measuring one merge), by time: the derivatives' seconds / the median seconds of a measurement;
a probe of k examples costs k/n of a measurement. Measuring every merge costs one FPE each.

    .venv/bin/python analysis/beyond_linear.py --run runs/interfering

Writes ``analysis/results/beyond_linear_<run>.{md,json}``; the per-example tensors are cached in
``--cache`` (default ``/tmp/taskvec_beyond_linear_<run>.safetensors``) so that re-scoring is instant.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from taskvec.interference import trust_band
from taskvec.linearize import accuracy
from taskvec.pipeline import load_config, merge_specs
from taskvec.runs import device_of, open_run
from taskvec.validation import DEFAULT_LAMBDAS, derivative_phase, load_context
from taskvec.validation.context import scale_deltas
from taskvec.validation.probe import probe_positions, probe_prediction
from taskvec.validation.summary import spearman

ROOT = Path(__file__).resolve().parents[1]


def collect(run_dir: Path, config: str, n_eval: int, compare_float32: bool = False,
            exclude: tuple = ()) -> tuple[dict, dict]:
    """Per-example tensors of every merge and task: ``(tensors, meta)``; tensors named ``f0/<s>``,
    ``labels/<s>``, ``a/<m>/<s>`` (J·Δ), ``b/<m>/<s>`` (½D²f), ``true/<m>/<s>`` (measured outputs)."""
    from taskvec.validation import _merge_delta  # noqa: PLC2701 - the validate stage's own merge builder

    from taskvec.validation import DEFAULT_MERGES

    run = open_run(run_dir, require="vectors")
    configured = DEFAULT_MERGES if config == "none" else merge_specs(load_config(config))
    ctx = load_context(run, n_eval, 8, device_of(None), 0)
    tvs = [ctx.vectors[t] for t in ctx.names]
    specs = [m for m in configured if m.method not in ("ntk_aware", "ntk_aware_harmful", *exclude)]
    ta = {m.name: float(m.params.get("lambda", 1.0)) for m in specs
          if m.method == "task_arithmetic" and not set(m.params) - {"lambda"}}
    own = {m.name: _merge_delta(ctx, tvs, m) for m in specs if m.name not in ta}
    for lam in DEFAULT_LAMBDAS:
        if lam not in ta.values():
            ta[f"task_arithmetic λ={lam:g}"] = lam
    tick = time.perf_counter()
    der = derivative_phase(ctx, {"sum": ctx.sum_tau, **own}, True, progress=True)
    der_s = time.perf_counter() - tick
    out: dict[str, torch.Tensor] = {}
    der32_s = None
    if compare_float32:  # the same terms from float32 differences (half the cost): a32/ b32/ tensors
        tick = time.perf_counter()
        der32 = derivative_phase(ctx, {"sum": ctx.sum_tau, **own}, True, progress=True, precision="float32")
        der32_s = time.perf_counter() - tick
    for s in ctx.names:
        out[f"f0/{s}"], out[f"labels/{s}"] = der.D[s].f0, der.D[s].labels
    measure_s = []
    for name in [*own, *ta]:
        if name in ta:
            first, half = der.ta_terms({t: ta[name] for t in ctx.names})
            delta = scale_deltas(ctx.sum_tau, ta[name])
        else:
            first, half = der.merge_terms(name)
            delta = own[name]
        tick = time.perf_counter()
        true = ctx.measure(delta)
        measure_s.append(time.perf_counter() - tick)
        for s in ctx.names:
            out[f"a/{name}/{s}"], out[f"b/{name}/{s}"], out[f"true/{name}/{s}"] = first[s], half[s], true[s]
        if compare_float32:
            f32, h32 = der32.ta_terms({t: ta[name] for t in ctx.names}) if name in ta else der32.merge_terms(name)
            for s in ctx.names:
                out[f"a32/{name}/{s}"], out[f"b32/{name}/{s}"] = f32[s], h32[s]
    ft = {s: accuracy(ctx.measure(ctx.vectors[s].deltas, tasks=[s])[s], der.D[s].labels) for s in ctx.names}
    meta = {"tasks": ctx.names, "merges": [*own, *ta], "derivative_seconds": der_s,
            "derivative_seconds_float32": der32_s,
            "measure_seconds_median": statistics.median(measure_s), "finetuned": ft,
            "n_eval": {s: int(der.D[s].labels.numel()) for s in ctx.names},
            "float64_forwards": 1 + len(ctx.names) + 2 * (1 + len(own)), "excluded": list(exclude)}
    return out, meta


def _taylor_rows(T: dict, meta: dict, max_unc: float) -> list[dict]:
    rows = []
    for m in meta["merges"]:
        for s in meta["tasks"]:
            f0, y = T[f"f0/{s}"], T[f"labels/{s}"]
            a, b, true = T[f"a/{m}/{s}"], T[f"b/{m}/{s}"], T[f"true/{m}/{s}"]
            band = trust_band(a, b, f0 + a + b, max_unc)
            den = a - b
            safe = den.abs() > 1e-6 * a.abs().clamp_min(1e-12)
            pade = f0 + torch.where(safe, a * a / torch.where(safe, den, torch.ones_like(den)), a)
            rows.append({"merge": m, "task": s, "base": accuracy(f0, y), "measured": accuracy(true, y),
                         "taylor1": accuracy(f0 + a, y), "taylor2": accuracy(f0 + a + b, y),
                         "gated": accuracy(f0 + a + (b if band["curvature"] < 1 else 0), y),
                         "pade": accuracy(pade, y), "rho": band["curvature"],
                         "taylor_trusted": band["trusted"], "taylor_uncertainty": band["uncertainty"]})
            if f"a32/{m}/{s}" in T:  # the same terms from float32 differences
                a32, b32 = T[f"a32/{m}/{s}"], T[f"b32/{m}/{s}"]
                rows[-1].update({"taylor2_f32": accuracy(f0 + a32 + b32, y),
                                 "taylor_trusted_f32": trust_band(a32, b32, f0 + a32 + b32, max_unc)["trusted"],
                                 "flips_f32": int(((f0 + a32 + b32).argmax(-1) != (f0 + a + b).argmax(-1)).sum()),
                                 "rel_err_f32": float((a32 - a).norm() / a.norm().clamp_min(1e-12))})
    return rows


def _probe(T: dict, row: dict, k: int, seed: int, order: int) -> dict:
    s, m = row["task"], row["merge"]
    f0, y, true = T[f"f0/{s}"], T[f"labels/{s}"], T[f"true/{m}/{s}"]
    pos = probe_positions(len(y), k, seed)
    a = T[f"a/{m}/{s}"] if order >= 1 else torch.zeros_like(f0)
    b = T[f"b/{m}/{s}"] if order == 2 or (order == 3 and row["rho"] < 1) else None
    return probe_prediction(f0, a, b, y, pos, true[pos])


def _taylor_check(T: dict, row: dict, k: int, seed: int) -> bool:
    """Whether the plain second-order expansion is kept: its series converges (ρ < 1) and the probe finds no
    bias in it (|mean error| ≤ 2 se)."""
    if row["rho"] >= 1:
        return False
    s, m = row["task"], row["merge"]
    f0, y, true = T[f"f0/{s}"], T[f"labels/{s}"], T[f"true/{m}/{s}"]
    pos = probe_positions(len(y), k, seed)
    return probe_prediction(f0, T[f"a/{m}/{s}"], T[f"b/{m}/{s}"], y, pos, true[pos])["taylor_consistent"]


def score(rows: list[dict], key: str, trusted=None) -> dict:
    dp = [r[key] - r["base"] for r in rows]
    dm = [r["measured"] - r["base"] for r in rows]
    err = [100 * abs(p - q) for p, q in zip(dp, dm)]
    out = {"spearman": spearman(dp, dm), "mae": float(np.mean(err)), "max_error": float(np.max(err))}
    if trusted is not None:
        t = [e for e, ok in zip(err, trusted) if ok]
        out.update({"n_trusted": len(t), "flagged_share": 1 - len(t) / len(rows),
                    "mae_trusted": float(np.mean(t)) if t else None,
                    "max_error_trusted": float(np.max(t)) if t else None})
    return out


def evaluate(T: dict, meta: dict, sizes: list[int], seeds: int, max_unc: float, probe_unc: float = 3.0) -> dict:
    rows = _taylor_rows(T, meta, max_unc)
    res = {"taylor1": score(rows, "taylor1"), "gated": score(rows, "gated"), "pade": score(rows, "pade"),
           "taylor2": score(rows, "taylor2", [r["taylor_trusted"] for r in rows])}
    if "taylor2_f32" in rows[0]:
        res["taylor2 (float32 differences)"] = score(rows, "taylor2_f32", [r["taylor_trusted_f32"] for r in rows]) | {
            "examples_flipped_vs_float64": sum(r["flips_f32"] for r in rows),
            "max_rel_error_first_order": max(r["rel_err_f32"] for r in rows),
            "same_trust_flags": sum(r["taylor_trusted_f32"] == r["taylor_trusted"] for r in rows)}
    n_eval = statistics.mean(meta["n_eval"].values())
    for k in sizes:
        for order in (0, 1, 2, 3):
            per_seed, cover, per_seed_h = [], [], []
            for seed in range(seeds):
                pr = [_probe(T, r, k, seed, order) for r in rows]
                for r, p in zip(rows, pr):
                    r["probe"], r["probe_unc"] = p["predicted"], p["uncertainty"]
                    # the Taylor prediction kept where trusted, or where the probe finds no bias in it
                    r["kept"] = r["taylor_trusted"] or (order == 3 and _taylor_check(T, r, k, seed))
                    r["hybrid"] = r["taylor2"] if r["kept"] else p["predicted"]
                trusted = [p["uncertainty"] <= probe_unc for p in pr]
                per_seed.append(score(rows, "probe", trusted))
                cover.append(100 * float(np.mean([100 * abs(r["probe"] - r["measured"]) <= r["probe_unc"]
                                                  for r in rows])))
                if order == 3:
                    ht = [r["taylor_trusted"] or (not r["kept"] and p["uncertainty"] <= probe_unc)
                          for r, p in zip(rows, pr)]
                    per_seed_h.append(score(rows, "hybrid", ht))
            res[f"probe{order if order < 3 else '1/2'} k={k}"] = _mean(per_seed) | {"coverage": float(np.mean(cover)),
                                                            "probe_fpe_per_merge": k / n_eval}
            if per_seed_h:
                res[f"hybrid k={k}"] = _mean(per_seed_h) | {"probe_fpe_per_merge": k / n_eval}
    return {"rows": rows, "scores": res}


def _mean(dicts: list[dict]) -> dict:
    out = {}
    for key in dicts[0]:
        vals = [d[key] for d in dicts if d[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
        if key in ("spearman", "mae") and len(vals) > 1:
            out[key + "_sd"] = float(np.std(vals))
    return out


def markdown(res: dict, meta: dict, args) -> str:
    M = len(meta["merges"])
    der_fpe = meta["derivative_seconds"] / meta["measure_seconds_median"]
    lines = [f"Measured by `python analysis/beyond_linear.py --run {args.run}` on {platform.machine()} CPU, "
             f"torch {torch.__version__}: {M} merges × {len(meta['tasks'])} tasks, "
             f"{statistics.mean(meta['n_eval'].values()):.0f} evaluation examples per task"
             + (f" (configured merges left out: {', '.join(meta['excluded'])})" if meta.get("excluded") else "")
             + f", probes averaged over "
             f"{args.seeds} draws. Derivatives (f0, J·τ_t, first + second order along Σ τ and every other "
             f"merge: {meta['float64_forwards']} float64 forwards) cost {der_fpe:.1f} FPE; measuring every "
             f"merge costs {M} FPE."
             + (f" The same from float32 differences: {meta['derivative_seconds_float32'] / meta['measure_seconds_median']:.1f} FPE."
                if meta.get("derivative_seconds_float32") else ""), "",
             f"Unflagged: trusted Taylor predictions (band ≤ {args.max_uncertainty:g} points) and probe predictions "
             f"with uncertainty ≤ {args.probe_max_uncertainty:g} points.", "",
             "| predictor | Spearman (changes) | MAE (points) | max error | unflagged MAE | flagged share | "
             "coverage of ±uncertainty | added cost (FPE, all merges) |", "|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="{:.3f}"):
        return "—" if x is None else fmt.format(x)

    for name, s in res["scores"].items():
        extra = s.get("probe_fpe_per_merge")
        lines.append(f"| {name} | {f(s['spearman'])} | {f(s['mae'], '{:.2f}')} | {f(s['max_error'], '{:.1f}')} | "
                     f"{f(s.get('mae_trusted'), '{:.2f}')} | {f(s.get('flagged_share'), '{:.2f}')} | "
                     f"{f(s.get('coverage'), '{:.0f}%')} | {f(None if extra is None else extra * M, '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from safetensors.torch import load_file, save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/interfering")
    p.add_argument("--config", default=None, help="the run's config, for its merges (default: the run directory's "
                                                  "name; 'none': the validate stage's default merges)")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--probe-sizes", default="25,50,100")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-uncertainty", type=float, default=1.0, help="trust threshold of the Taylor band (points)")
    p.add_argument("--probe-max-uncertainty", type=float, default=3.0,
                   help="trust threshold of the probe-calibrated predictions (points)")
    p.add_argument("--cache", default=None)
    p.add_argument("--exclude", default="", help="comma-separated merge methods of the config to leave out "
                                                 "(e.g. fisher: its statistics take long on a full-scope CPU run)")
    p.add_argument("--compare-float32", action="store_true",
                   help="also take the derivatives from float32 differences and score the predictions from them")
    p.add_argument("--results-dir", default=str(ROOT / "analysis" / "results"))
    p.add_argument("--readme", action="store_true", help="publish the table in README.md (beyond-linear-<run> markers)")
    args = p.parse_args(argv)
    name = Path(args.run).name
    cache = Path(args.cache or f"/tmp/taskvec_beyond_linear_{name}.safetensors")
    if cache.exists():
        T = load_file(cache)
        meta = json.loads(cache.with_suffix(".json").read_text())
    else:
        T, meta = collect(Path(args.run), args.config or name, args.n_eval, args.compare_float32,
                          tuple(m for m in args.exclude.split(",") if m))
        save_file({k: v.contiguous() for k, v in T.items()}, cache)
        cache.with_suffix(".json").write_text(json.dumps(meta))
    res = evaluate(T, meta, [int(k) for k in args.probe_sizes.split(",")], args.seeds, args.max_uncertainty,
                   args.probe_max_uncertainty)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res, meta, args)
    (out / f"beyond_linear_{name}.md").write_text(md)
    (out / f"beyond_linear_{name}.json").write_text(json.dumps({"meta": meta, **res}, indent=1, default=float))
    print(md)
    if args.readme:
        from taskvec.io import replace_marked_section

        if not replace_marked_section(ROOT / "README.md", f"beyond-linear-{name}", md):
            print(f"README.md has no <!-- beyond-linear-{name}:start/end --> markers; nothing replaced")
    worst = sorted(res["rows"], key=lambda r: -abs(r["taylor2"] - r["measured"]))[:8]
    for r in worst:
        print(f"{r['merge']:28s} {r['task']:16s} ρ={r['rho']:.2f} base {100*r['base']:.1f} meas "
              f"{100*r['measured']:.1f} t1 {100*r['taylor1']:.1f} t2 {100*r['taylor2']:.1f} "
              f"pade {100*r['pade']:.1f} probe {100*r['probe']:.1f}±{r['probe_unc']:.1f}")


if __name__ == "__main__":
    main()
