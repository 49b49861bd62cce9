"""``taskvec report RUN/``: an offline HTML page with PNG figures, drawn only from saved results.

Reads, through :class:`taskvec.runs.Run`, the fine-tuning logs (learning curves, stop steps, the spectral
rule's summary), the validation results (:func:`taskvec.validation.validate_run`) and, when present, the
ntk stage's spectra, confidence intervals and effective ranks (:func:`taskvec.stages.ntk.run_ntk`), and writes

* ``RUN/report/report.html`` — tables and figures (open it in any browser; no network); an existing
  report is replaced only with ``overwrite=True`` (``--overwrite``),
* ``RUN/report/*.png`` — the figures,
* ``RUN/results.json`` — every number of the page in one JSON file.

Nothing is computed here but summaries of saved numbers (a decay fit of a saved spectrum at most).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .io import atomic_file, write_json


def collect(run_dir) -> dict:
    """All saved results of a run as one dict (what ``RUN/results.json`` holds), read through
    :class:`taskvec.runs.Run`: ``run`` (run.json's base, scope, tasks), ``finetune`` ({task: log}),
    ``ntk`` (the ntk stage's summary and spectrum reports, or ``None``), ``validation`` (or ``None``),
    ``lm_validation`` (an LM run's :func:`taskvec.lm_validate.validate_lm_run` results, or ``None``)."""
    from .runs import open_run

    run = open_run(run_dir, require="finetune")  # a run whose tasks never finished has nothing to report
    desc = run.description()
    if run.kind == "study":  # where each task's head came from (HeadSpec.source)
        desc["heads"] = {t: (rt.head.source if rt.head is not None else None) for t, rt in run.tasks.items()}
    return {"run": desc,
            "finetune": run.finetune_logs(), "validation": run.validation_results(), "ntk": run.ntk_results(),
            "lm_validation": run.lm_validation_results()}


# --- figures -----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path.name


def fig_learning_curves(logs: dict, out: Path) -> str | None:
    if not logs:
        return None
    plt = _plt()
    n = len(logs)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 5.2), squeeze=False, sharex="col")
    for j, (t, log) in enumerate(logs.items()):
        top, bottom = axes[0, j], axes[1, j]
        c = [e for e in log["curve"] if e.get("val_loss") is not None]
        steps = [e["step"] for e in c]
        top.plot(steps, [e["val_loss"] for e in c], "o-", label="validation", color="C0")
        tr = [(e["step"], e["train_loss"]) for e in c if e.get("train_loss") is not None]
        if tr:
            top.plot(*zip(*tr), "s--", label="train", color="C2", alpha=0.7)
        bottom.plot(steps, [100 * e["val_accuracy"] for e in c], "^-", color="C1", label="validation")
        for ax in (top, bottom):
            ax.axvline(log["best_step"], color="k", ls=":", lw=1)
            for r in log.get("rules", []):
                if r.get("rule") == "spectral" and r.get("predicted_step") is not None:
                    ax.axvline(r["predicted_step"], color="C3", ls="--", lw=1)
        top.set_title(f"{t}\nkept step {log['best_step']}, stopped at {log['steps']}", fontsize=9)
        bottom.set_xlabel("step")
        if j == 0:
            top.set_ylabel("loss")
            bottom.set_ylabel("validation accuracy (%)")
            top.legend(fontsize=7)
    fig.suptitle("Learning curves (dotted: validation-best step, kept; dashed: spectral rule's step)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "learning_curves.png")


def fig_spectra(val: dict | None, out: Path) -> tuple[str | None, dict]:
    if not val or not val.get("eigen", {}).get("spectra"):
        return None, {}
    from .spectrum import SpectrumError, fit_decay

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    fits = {}
    for i, (t, lam) in enumerate(val["eigen"]["spectra"].items()):
        lam = np.asarray([x for x in lam if x > 0])
        idx = np.arange(1, lam.size + 1)
        ax.loglog(idx, lam / lam[0], ".", ms=3, color=f"C{i}", label=t)
        try:
            f = fit_decay(lam)
            fits[t] = {"alpha": f.alpha, "r2": f.r2, "window": [f.start, f.stop], "better": f.better}
            xs = np.arange(f.start, f.stop + 1)
            ax.loglog(xs, np.exp(f.log_c - f.alpha * np.log(xs)) / lam[0], "-", color=f"C{i}", lw=1,
                      label=f"  fit α={f.alpha:.2f} (R²={f.r2:.2f})")
        except SpectrumError:
            pass
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i / λ_1")
    ax.set_title("eNTK spectra at θ0 (multi-output kernel, scope of the run)")
    ax.legend(fontsize=7)
    return _save(fig, out / "spectra.png"), fits


def _heat(ax, M, labels, title, fmt="{:.2f}", cmap="viridis", vmin=None, vmax=None):
    M = np.asarray(M, dtype=float)
    im = ax.imshow(M, cmap=cmap, vmin=vmin, vmax=vmax)
    short = [x if len(x) <= 12 else x[:11] + "…" for x in labels]
    ax.set_xticks(range(len(labels)), short, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), short, fontsize=8)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            r, g, b, _ = im.cmap(im.norm(M[i, j]))
            ax.text(j, i, fmt.format(M[i, j]), ha="center", va="center", fontsize=7,
                    color="k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w")
    ax.set_title(title, fontsize=9)
    return im


def fig_geometry(val: dict | None, out: Path) -> str | None:
    if not val:
        return None
    plt = _plt()
    names = val["tasks"]
    panels = [(val["weight_space"]["cosine"], "task-vector cosine", "{:.3f}")]
    if val.get("eigen", {}).get("overlap"):
        e = val["eigen"]
        panels.insert(0, (e["overlap"], f"top-{e['rank']} eigenspace overlap\n(random {e['random_baseline']:.1e})",
                          "{:.2f}"))
        panels.append((e["energy"], "share of ‖τ_t‖² in task s's top-r\n(rows s, columns t)", "{:.3f}"))
    panels.append((val["weight_space"]["sign_conflicts"], "sign conflicts (fraction)", "{:.2f}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.0))
    for ax, (M, title, fmt) in zip(np.atleast_1d(axes), panels):
        _heat(ax, M, names, title, fmt)
    fig.tight_layout()
    return _save(fig, out / "geometry.png")


def fig_interference(val: dict | None, out: Path) -> str | None:
    if not val:
        return None
    plt = _plt()
    names = val["tasks"]
    P = 100 * np.asarray(val["interference"]["predicted"])
    M = 100 * np.asarray(val["interference"]["measured"])
    lim = max(np.abs(P).max(), np.abs(M).max(), 1e-9)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.4))
    _heat(axes[0], P, names, "predicted Δacc of task s from τ_t (points)", "{:+.1f}", "RdBu", -lim, lim)
    _heat(axes[1], M, names, "measured Δacc of task s from τ_t (points)", "{:+.1f}", "RdBu", -lim, lim)
    for ax in axes:
        ax.set_ylabel("task s (evaluated)")
        ax.set_xlabel("τ_t (added)")
    fig.tight_layout()
    return _save(fig, out / "interference.png")


def fig_scatter(val: dict | None, out: Path) -> str | None:
    if not val:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    for i, m in enumerate(val["merges"]):
        pts = [(100 * (e["predicted"] - e["base"]), 100 * (e["measured"] - e["base"]), e["trusted"],
                e.get("uncertainty") or 0.0) for e in m["per_task"].values()]
        for x, y, ok, u in pts:  # horizontal bar: the prediction's own uncertainty band (points)
            ax.errorbar(x, y, xerr=u, fmt="o" if ok else "x", color=f"C{i % 10}", ms=6, elinewidth=0.8, capsize=2)
        ax.plot([], [], "o", color=f"C{i % 10}", label=m["name"])
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    order = "second order" if val["summary"].get("order", 1) == 2 else "first order"
    ax.set_xlabel(f"predicted accuracy change (points, {order})")
    ax.set_ylabel("measured accuracy change (points)")
    s = val["summary"]
    sp = s.get("spearman_change")
    ax.set_title(f"every (merge, task): Spearman {sp:.3f}" if sp is not None else "every (merge, task)",
                 fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    ax.text(0.98, 0.02, "o trusted   x untrusted", transform=ax.transAxes, ha="right", fontsize=7)
    return _save(fig, out / "predicted_vs_measured.png")


def fig_normalized(val: dict | None, out: Path) -> str | None:
    """Bars of normalized accuracy (merged / individually fine-tuned, %) per merge and task, drawn up or down
    from the 100% line, on an axis just wide enough for the values (each annotated)."""
    if not val:
        return None
    plt = _plt()
    names = val["tasks"]
    merges = val["merges"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(merges)), 3.8))
    w = 0.8 / (len(names) + 1)
    small = len(merges) * (len(names) + 1) > 24
    every = []
    for j, t in enumerate(names + ["average"]):
        vals = np.asarray([100 * (np.mean([m["per_task"][s]["normalized_measured"] for s in names]) if t == "average"
                                  else m["per_task"][t]["normalized_measured"]) for m in merges], dtype=float)
        every += list(vals)
        xs = np.arange(len(merges)) + j * w
        ax.bar(xs, vals - 100, w, bottom=100, label=t, color="k" if t == "average" else f"C{j}")
        for x, v in zip(xs, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}", (x, v), xytext=(0, 2 if v >= 100 else -2), textcoords="offset points",
                            ha="center", va="bottom" if v >= 100 else "top", fontsize=5 if small else 6,
                            rotation=90 if small else 0)
    ax.set_xticks(np.arange(len(merges)) + 0.4 - w / 2, [m["name"] for m in merges], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("normalized accuracy (%)")
    ax.axhline(100, color="k", lw=0.8, ls="--")
    finite = [v for v in every if np.isfinite(v)]
    lo, hi = min(finite + [100.0]), max(finite + [100.0])
    pad = max(0.5, 0.12 * (hi - lo))
    ax.set_ylim(lo - pad, hi + 2.5 * pad)  # room above for the annotations and the legend
    ax.legend(fontsize=7, ncol=min(len(names) + 1, 5), loc="upper left")
    ax.set_title("merged / individually fine-tuned accuracy, per task (dashed: 100% = fine-tuned)")
    return _save(fig, out / "normalized_accuracy.png")


def fig_coefficients(val: dict | None, out: Path) -> str | None:
    if not val or not val.get("coefficients", {}).get("grid"):
        return None
    plt = _plt()
    c = val["coefficients"]
    g = c["grid"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([x["lambda"] for x in g], [100 * x["measured"] for x in g], "o-", label="measured (grid search)")
    ax.plot([x["lambda"] for x in g], [100 * x["predicted"] for x in g], "s--", label="predicted (linearised)")
    ch = c["chosen"]["global"]
    lam = next(iter(ch["coefficients"].values()))
    ax.plot([lam], [100 * ch["measured"]], "r*", ms=14, label=f"prediction-chosen λ={lam:g} (measured)")
    ax.set_xlabel("λ (task arithmetic θ0 + λ·Στ)")
    ax.set_ylabel("average normalized accuracy (%)")
    ax.legend(fontsize=7)
    return _save(fig, out / "coefficients.png")


# --- the page ------------------------------------------------------------------------------------------------


def _table(rows: list[list], header: list[str], left: tuple[int, ...] = (0,)) -> str:
    """An HTML table, every cell escaped; columns ``left`` are left-aligned (text), the others right (numbers)."""
    def cell(tag, i, x):
        return f"<{tag} class=l>{html.escape(str(x))}</{tag}>" if i in left else f"<{tag}>{html.escape(str(x))}</{tag}>"

    h = "".join(cell("th", i, x) for i, x in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, x) for i, x in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_table(rows: list[list], header: list[str]) -> str:
    def line(cells):
        return "| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def _pct(x, signed=False):
    if x is None:
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _task_results(logs: dict) -> list:
    """The fine-tuning logs as :class:`~taskvec.finetune.TaskResult` objects."""
    from .finetune import TaskResult

    keys = TaskResult.__dataclass_fields__.keys()
    return [TaskResult(**{k: v[k] for k in keys if k in v}) for v in logs.values()]


def summary_tables(val: dict) -> list[tuple[list[str], list[list[str]]]]:
    """The validation's headline numbers as ``(header, rows)`` tables (cells are strings): the measures
    (rank correlation, errors, trusted/flagged, coefficients) and the average normalized accuracy per merge.
    :func:`summary_markdown` and the HTML report both render these."""
    s, c = val["summary"], val["coefficients"]

    def num(key, fmt=".3f"):
        return f"{s[key]:{fmt}}" if s.get(key) is not None else "–"

    order2 = s.get("order", 1) == 2
    rows = [[(f"Spearman, predicted vs measured accuracy change (all {s['n_predictions']} merge×task pairs, "
              f"{'second' if order2 else 'first'} order)"), num("spearman_change")]]
    if order2 and s.get("spearman_change_1st") is not None:
        rows.append(["same, first order only", num("spearman_change_1st")])
    if s.get("n_probed"):
        rows += [["same, the Taylor expansion everywhere (no probes)", num("spearman_change_taylor")],
                 ["flagged expansions replaced by probe-calibrated predictions (probe.py) / kept after the probe "
                  "found no bias in them", f"{s['n_probed']} (MAE {s['mae_points_probed']:.2f} points; the "
                  f"expansion everywhere: MAE {s['mae_points_taylor']:.2f}) / {s.get('n_probe_checked', 0)}"]]
    rows += [
        ["mean absolute error, all predictions (points)",
         (f"{s['mae_points']:.2f} (first order {s['mae_points_1st']:.2f}; no-change baseline "
          f"{s['mae_points_nochange_baseline']:.2f})")],
        [f"mean absolute error, trusted predictions (uncertainty ≤ {s['max_uncertainty']:g} points)",
         f"{s['mae_points_trusted']:.2f} ({s['n_trusted']} trusted)" if s.get("mae_points_trusted") is not None
         else "– (0 trusted)"],
        ["mean absolute error, flagged predictions",
         f"{s['mae_points_untrusted']:.2f} ({s['n_untrusted']} flagged)"
         if s.get("mae_points_untrusted") is not None else "– (0 flagged)"],
        ["interference matrix, Spearman predicted vs measured (off-diagonal)", num("interference_spearman")],
        [(f"grid-search best avg normalized accuracy (λ={c['grid_best_lambda']:g}, {c['grid_evaluations']} "
          "full evaluations)"), f"{100 * c['grid_best_measured']:.2f}%"],
        ["prediction-chosen global λ (1 full evaluation)",
         f"{100 * c['chosen']['global']['measured']:.2f}% (gap {c['gap_points_global']:+.2f} points)"],
        ["prediction-chosen per-task coefficients (1 full evaluation)",
         f"{100 * c['chosen']['per_task']['measured']:.2f}% (gap {c['gap_points_per_task']:+.2f} points)"],
    ]
    comp = val.get("compute") or {}
    if comp.get("prediction_fpe") is not None:
        rows.append(["cost of the predictions phase (all merges' directions), in full evaluations by time "
                     f"(1 = {comp['seconds_per_fpe']:.1f} s) / of the measured λ grid",
                     f"{comp['prediction_fpe']:.1f} / {comp['grid_fpe']:.0f}"])
        if comp.get("measure_all_fpe"):
            rows.append(["same (with probes) / measuring every predicted merge (configured, NTK-aware, λ grid, "
                         "chosen coefficients, single tasks, pairs)",
                         f"{comp['prediction_fpe']:.1f} / {comp['measure_all_fpe']:.0f}"])
    h = s.get("heldout")
    if h:
        n_h = sorted(set(h["n_holdout"].values()))
        cov = "–" if h.get("coverage_trusted") is None else f"{100 * h['coverage_trusted']:.0f}%"
        if h.get("coverage_trusted_premerge") is not None:
            cov += f" ({100 * h['coverage_trusted_premerge']:.0f}% with se from the predicted changes)"
        rows += [
            [f"held-out check ({'/'.join(map(str, n_h))} other test examples per task"
             + (f"; none left for {', '.join(h['tasks_without_holdout'])}" if h.get("tasks_without_holdout") else "")
             + "): Spearman, predicted vs measured accuracy change",
             "–" if h["spearman_change"] is None else f"{h['spearman_change']:.3f}"],
            ["held-out: mean absolute error, trusted / flagged predictions (points)",
             ("–" if h["mae_points_trusted"] is None else f"{h['mae_points_trusted']:.2f}") + " / "
             + ("–" if h["mae_points_untrusted"] is None else f"{h['mae_points_untrusted']:.2f}")],
            ["held-out: trusted predictions within their band widened by sampling error (u + 2·se, se from the "
             "measured per-example changes; mean se "
             f"{h['mean_se_points']:.2f} points)", cov],
            [f"held-out: avg normalized accuracy of the λ the measured grid chose (λ={h['coefficients']['grid_best_lambda']:g}) "
             "/ the predictions' global λ / per-task coefficients",
             f"{100 * h['coefficients']['grid_best_measured']:.2f}% / {100 * h['coefficients']['chosen_global_measured']:.2f}% / "
             f"{100 * h['coefficients']['chosen_per_task_measured']:.2f}%"],
        ]
    merges = [[m["name"], f"{100 * np.mean([e['normalized_measured'] for e in m['per_task'].values()]):.2f}%",
               f"{100 * np.mean([e['normalized_predicted'] for e in m['per_task'].values()]):.2f}%"]
              for m in val["merges"]]
    return [(["measure", "value"], rows),
            (["merge", "avg normalized accuracy (measured)", "predicted"], merges)]


def summary_markdown(res: dict) -> str:
    """The headline numbers as markdown tables, separated by blank lines (used in the README)."""
    blocks = []
    if res.get("finetune"):
        from .finetune import results_table

        blocks.append(results_table(_task_results(res["finetune"])))
    if res.get("validation"):
        blocks += [_markdown_table(rows, header) for header, rows in summary_tables(res["validation"])]
    return "\n\n".join(blocks)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}.l{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}.note{color:#555;font-size:14px}code{background:#f5f5f5;padding:1px 4px}"""


def write_report(run_dir, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``report.html`` + PNG figures into ``out`` (default ``RUN/report/``) and ``RUN/results.json``;
    return the page's path.

    An existing ``out`` is refused unless ``overwrite`` (then replaced whole); the directory appears only
    when the page is complete. Raises :class:`taskvec.runs.RunError` when ``run_dir`` is not a run.
    """
    import shutil

    from .io import atomic_dir, check_output

    run_dir = Path(run_dir)
    res = collect(run_dir)
    out = check_output(Path(out) if out else run_dir / "report", overwrite)
    with atomic_dir(out, overwrite) as tmp:
        val = res["validation"]
        figs = {"curves": fig_learning_curves(res["finetune"], tmp)}
        figs["spectra"], fits = fig_spectra(val, tmp)
        figs["geometry"] = fig_geometry(val, tmp)
        figs["interference"] = fig_interference(val, tmp)
        figs["scatter"] = fig_scatter(val, tmp)
        figs["normalized"] = fig_normalized(val, tmp)
        figs["coefficients"] = fig_coefficients(val, tmp)
        ntk_figs = []
        for f in (res["ntk"] or {}).get("figures", []):  # the ntk stage's own plots, copied: a self-contained page
            shutil.copy2(f, tmp / f"ntk_{Path(f).name}")
            ntk_figs.append(f"ntk_{Path(f).name}")
        res["decay_fits"] = fits
        res["summary_markdown"] = summary_markdown(res)
        parts = [_header(run_dir, res["run"]), *_study_section(res["run"]), *_finetune_section(res["finetune"], figs),
                 *_ntk_section(res["ntk"], ntk_figs)]
        if val:
            parts += _validation_section(val, figs)
        if res["lm_validation"]:
            from .report_lm import fig_lm_scatter, lm_section

            figs["lm_scatter"] = fig_lm_scatter(res["lm_validation"], tmp)
            parts += lm_section(res["lm_validation"], figs)
        page = ("<!doctype html><html><head><meta charset=utf-8><title>taskvec report</title><style>" + CSS
                + "</style></head><body>" + "\n".join(parts) + "</body></html>")
        (tmp / "report.html").write_text(page, encoding="utf-8")
        write_json(run_dir / "results.json", res)
    return out / "report.html"


def _calibration_table(calib: list[dict], columns: list[str]) -> str:
    """A calibration table (``summary.calibration`` / held-out ``calibration`` rows): threshold, count, then
    MAE, max error and (held-out) coverage."""
    def cell(v, fmt):
        return "–" if v is None else fmt.format(v)

    rows = [["∞" if c["max_uncertainty"] is None else f"{c['max_uncertainty']:g}", str(c["n"]),
             cell(c["mae_points"], "{:.2f}"), cell(c["max_error_points"], "{:.2f}"),
             *([cell(None if c["coverage"] is None else 100 * c["coverage"], "{:.0f}%")] if "coverage" in c else []),
             *([cell(None if c["coverage_premerge"] is None else 100 * c["coverage_premerge"], "{:.0f}%")]
               if "coverage_premerge" in c else [])]
            for c in calib]
    return _table(rows, ["uncertainty ≤ (points)", "predictions", *columns], left=())


def _img(name: str | None, alt: str) -> list[str]:
    return [f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'] if name else []


def _header(run_dir: Path, meta: dict) -> str:
    return (f"<h1>taskvec report</h1><p class=note>Run <code>{html.escape(str(run_dir))}</code>: base "
            f"<code>{html.escape(str(meta.get('base_model', '')))}</code>, scope "
            f"<code>{html.escape(str(meta.get('scope', '')))}</code>, tasks "
            f"{html.escape(', '.join(meta.get('tasks', [])))}. All numbers below are measured by this run and "
            "also saved in <code>results.json</code>.</p>")


def _study_section(meta: dict) -> list[str]:
    """A study's checkpoints (made elsewhere): one row per task."""
    if meta.get("kind") != "study":
        return []
    study = meta.get("study") or {}
    data = {t["name"]: t for t in study.get("tasks", [])}
    rows = [[t, src["model"], src["kind"], str(data.get(t, {}).get("data", "")),
             str((meta.get("heads") or {}).get(t) or "")] for t, src in (meta.get("sources") or {}).items()]
    return ["<h2>Checkpoints</h2>",
            f"<p class=note>A study of checkpoints made elsewhere: task vectors of full fine-tunes in scope "
            f"<code>{html.escape(str(meta.get('scope')))}</code>, LoRA adapters as their exact ΔW; each task keeps "
            "its checkpoint's own head (never merged).</p>",
            _table(rows, ["task", "checkpoint", "kind", "data", "head"], left=(0, 1, 2, 3, 4))]


def _finetune_section(logs: dict, figs: dict) -> list[str]:
    if not logs:
        return []
    from .finetune import RESULT_COLUMNS

    rows = [r.table_row() for r in _task_results(logs)]  # whole stop reasons
    return ["<h2>1. Fine-tuning with early stopping</h2>",
            _table(rows, RESULT_COLUMNS, left=(0, RESULT_COLUMNS.index("stop"))), *_img(figs["curves"], "learning curves")]


def ntk_rows(ntk: dict) -> list[list[str]]:
    """One row per task of the ntk stage: kernel size, decay exponent with its bootstrap interval,
    effective ranks, kernel-target alignment, kernel-ridge accuracy, seconds (:data:`NTK_COLUMNS`)."""
    rows = []
    for t, rep in ntk["spectra"].items():
        sp = rep.get("uncentered") or {}
        d, r = sp.get("decay") or {}, sp.get("ranks") or {}
        ci = d.get("alpha_ci")
        alpha = "–" if d.get("alpha") is None else f"{d['alpha']:.3f}"
        if ci:
            alpha += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        kr = rep.get("kernel_ridge") or {}

        def num(x, fmt):
            return "–" if x is None else format(x, fmt)

        rows.append([t, str(sp.get("n", "–")), alpha, num(r.get("participation_ratio"), ".1f"),
                     num(r.get("entropy_rank"), ".1f"), num(r.get("stable_rank"), ".1f"), str(r.get("k90", "–")),
                     num(rep.get("alignment"), ".3f"), num(kr.get("cv_accuracy"), ".3f"),
                     num((rep.get("meta") or {}).get("seconds"), ".1f")])
    return rows


NTK_COLUMNS = ["task", "n", "decay α [90% CI]", "participation ratio", "entropy rank", "stable rank", "k90",
               "alignment", "kernel-ridge CV acc.", "seconds"]


def _ntk_section(ntk: dict | None, figs: list[str]) -> list[str]:
    if not ntk or not ntk.get("spectra"):
        return []
    out = ["<h2>The ntk stage: each task's eNTK at θ0</h2>",
           "<p class=note>Eigenvalues λ_k ∝ k^−α of each task's uncentred kernel on its kernel inputs (decay fit "
           "with a bootstrap interval), effective ranks, kernel-target alignment and the cross-validated accuracy "
           "of kernel ridge regression on the kernel; from <code>RUN/ntk/</code>.</p>",
           _table(ntk_rows(ntk), NTK_COLUMNS)]
    for f in figs:
        out += _img(f, f.removeprefix("ntk_").removesuffix(".png"))
    return out


def _validation_section(val: dict, figs: dict) -> list[str]:
    c = val["coefficients"]
    parts = ["<h2>2. The base model's eNTK: spectra and eigenspaces</h2>", *_img(figs["spectra"], "spectra")]
    if val.get("eigen", {}).get("split_half"):
        e = val["eigen"]
        parts.append("<p class=note>Eigenspace overlap ‖V_Aᵀ V_B‖²_F / r between tasks' top-r parameter-space "
                     f"eigenspaces (r = {e['rank']}, {e['n_kernel']} training inputs per task); a random "
                     f"r-dimensional subspace gives {e['random_baseline']:.1e}; the same task split in halves "
                     "gives " + ", ".join(f"{t}: {v:.2f}" for t, v in e["split_half"].items()) + ".</p>")
    parts += _img(figs["geometry"], "overlaps and cosines")
    parts += ["<h2>3. Interference: predicted vs measured</h2>", *_img(figs["interference"], "interference")]
    if val.get("disentanglement"):
        parts.append(_table([[f"{d['pair'][0]} + {d['pair'][1]}", f"{d['predicted']:.3f}", f"{d['measured']:.3f}"]
                             for d in val["disentanglement"]], ["pair", "predicted ξ", "measured ξ"]))
    parts += ["<h2>4. Merges: predicted vs measured accuracy</h2>", *_img(figs["scatter"], "predicted vs measured")]
    rows = []
    for m in val["merges"]:
        for t, e in m["per_task"].items():
            unc = e.get("uncertainty")
            probed = e.get("predictor") == "probe"
            rows.append([m["name"], t, _pct(e["base"]), _pct(e["predicted_1st"]), _pct(e.get("predicted_2nd")),
                         _pct(e["predicted"]) if probed else "–",
                         "–" if unc is None else f"±{unc:.1f}", _pct(e["measured"]),
                         "yes" if e["trusted"] else "UNTRUSTED", f"{e['lin_error']:.2f}",
                         _pct(e["normalized_measured"])])
    parts.append(_table(rows, ["merge", "task", "base %", "predicted, 1st order %", "predicted, 2nd order %",
                               "probe-calibrated %", "uncertainty (points)", "measured %", "trusted",
                               "measured lin. error", "normalized %"], left=(0, 1, 8)))
    calib = val["summary"].get("calibration")
    if calib:
        parts.append("<p class='note'>Calibration of the trust signal: mean and largest absolute error of the "
                     "predictions whose uncertainty is at most the threshold (the signal is computed before "
                     "merging; the errors after measuring).</p>")
        parts.append(_calibration_table(calib, ["MAE (points)", "max error (points)"]))
    hcal = (val["summary"].get("heldout") or {}).get("calibration")
    if hcal:
        parts.append("<p class='note'>The same on held-out test examples: error of each prediction's accuracy "
                     "change against the change measured on examples the predictor did not see, and the share "
                     "within its band widened by sampling error (u + 2·se; se from the measured per-example "
                     "changes on the evaluation subset, and — last column — from the predicted ones).</p>")
        cols = ["held-out MAE (points)", "max error (points)", "within band"]
        parts.append(_calibration_table(hcal, cols + (["within band, pre-merge se"] if "coverage_premerge" in hcal[0]
                                                      else [])))
    parts += [_table(rows_, header, left=(0,)) for header, rows_ in summary_tables(val)]
    parts += _img(figs["normalized"], "normalized accuracy")
    parts += ["<h2>5. Choosing coefficients from predictions</h2>", *_img(figs["coefficients"], "coefficients")]
    parts.append(f"<p class=note>Grid search: {c['grid_evaluations']} full evaluations; prediction-chosen: 1. "
                 f"Gap to the grid-search best: {c['gap_points_global']:+.2f} points (global λ), "
                 f"{c['gap_points_per_task']:+.2f} points (per-task coefficients).</p>")
    parts.append(f"<p class=note>Validation wall time {val['wall_time_s']:.0f} s on {html.escape(val['device'])}; "
                 f"{val['evaluations']} merged models built and evaluated.</p>")
    if val.get("compute"):
        parts.append("<p class=note>Compute per phase, in forward-pass equivalents (FPE: one float32 forward over "
                     "every task's evaluation examples, what measuring one merge costs): the operations counted, "
                     "and the phase's seconds divided by the seconds of one measurement.</p>")
        parts.append(_table(*compute_table(val["compute"])[::-1], left=(0, 3)))
    return parts


def compute_table(compute: dict) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a validation's compute ledger (``results["compute"]``, see
    :mod:`taskvec.validation.costs`): per phase its seconds, FPE by time and the operations counted."""
    rows = []
    for name, ph in compute["phases"].items():
        ops = ", ".join(f"{op} {v:.2f}" for op, v in ph["ops"].items()) or "–"
        rows.append([name, f"{ph['seconds']:.1f}", "–" if ph["fpe_by_time"] is None else f"{ph['fpe_by_time']:.1f}",
                     ops])
    t = compute["total"]
    rows.append(["total", f"{t['seconds']:.1f}", "–" if t["fpe_by_time"] is None else f"{t['fpe_by_time']:.1f}", ""])
    return ["phase", "seconds", "FPE by time", "operations counted (FPE)"], rows
