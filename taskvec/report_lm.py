"""The report's section for causal-LM runs: predictions and measurements of merges in nats per token.

Drawn from ``RUN/validation/lm_results.json`` (:func:`taskvec.lm_validate.validate_lm_run`, read through
:meth:`taskvec.runs.Run.lm_validation_results`): the per-(merge, task) table (Taylor terms of both predictors,
the probe-calibrated headline, measured on the evaluation and held-out examples), the summary (Spearman,
errors), the calibration table in nats, the multiple-choice accuracies of ``choice`` tasks, the interference
matrix and the coefficient choice, and one figure (predicted vs measured).
"""

from __future__ import annotations

import html
from pathlib import Path


def _f(x, fmt="{:+.3f}"):
    return "–" if x is None else fmt.format(x)


def fig_lm_scatter(val: dict | None, out: Path) -> str | None:
    """Predicted vs measured mean-NLL change of every (merge, task), held-out examples, with ±uncertainty."""
    if not val:
        return None
    from .report import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    merges = list(dict.fromkeys(r["merge"] for r in val["rows"]))
    for r in val["rows"]:
        i = merges.index(r["merge"])
        u = r["uncertainty"] if r["uncertainty"] != float("inf") else 0.0
        ax.errorbar(r["predicted"], r["measured_heldout"], xerr=u, fmt="o" if r["trusted"] else "x",
                    color=f"C{i % 10}", ms=6, elinewidth=0.8, capsize=2)
    for i, m in enumerate(merges):
        ax.plot([], [], "o", color=f"C{i % 10}", label=m)
    lo, hi = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel("predicted mean-NLL change (nats per token)")
    ax.set_ylabel("measured, held-out examples (nats per token)")
    sp = val["summary"]["heldout"].get("spearman")
    ax.set_title(f"every (merge, task): held-out Spearman {sp:.3f}" if sp is not None else "every (merge, task)",
                 fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    ax.text(0.98, 0.02, "o trusted   x untrusted", transform=ax.transAxes, ha="right", fontsize=7)
    return _save(fig, out / "lm_predicted_vs_measured.png")


def _rows_table(val: dict) -> str:
    from .report import _table

    def second(r, p):
        return r.get(f"predicted_{p}_2nd", r[f"predicted_{p}"])

    rows = [[r["merge"], r["task"], f"{r['base_nll']:.3f}", _f(r["predicted_loglik_1st"]), _f(second(r, "loglik")),
             _f(r["predicted_logits_1st"]), _f(second(r, "logits")), f"{r['curvature']:.2f}",
             _f(r.get("probe_predicted")), _f(r["predicted"]), _f(r["uncertainty"], "±{:.3f}"), r["predictor"],
             _f(r["measured"]), _f(r["measured_heldout"]), "yes" if r["trusted"] else "UNTRUSTED"]
            for r in val["rows"]]
    return _table(rows, ["merge", "task", "base NLL", "loglik, 1st order", "loglik, 2nd order",
                         "linearised logits, 1st order", "linearised logits, 2nd order", "ρ", "probe-calibrated",
                         "headline", "uncertainty", "predictor", "measured", "measured, held-out", "trusted"],
                  left=(0, 1, 11, 14))


def _summary_table(val: dict) -> str:
    from .report import _table

    s = val["summary"]
    keys = [("spearman", "Spearman, headline", "{:.3f}"), ("spearman_taylor", "Spearman, Taylor only", "{:.3f}"),
            ("spearman_loglik_1st", "Spearman, loglik 1st order", "{:.3f}"),
            ("spearman_logits_1st", "Spearman, linearised logits 1st order", "{:.3f}"),
            ("mae_all", "MAE, headline (nats/token)", "{:.3f}"), ("mae_taylor", "MAE, Taylor only", "{:.3f}"),
            ("mae_trusted", "MAE, trusted", "{:.3f}"), ("n_trusted", "trusted predictions", "{}"),
            ("mae_no_change", "MAE of predicting no change", "{:.3f}")]
    rows = [[label, _f(s["eval"].get(k), fmt), _f(s["heldout"].get(k), fmt)] for k, label, fmt in keys]
    return _table(rows, ["", "evaluation examples", "held-out examples"])


def _calibration(val: dict) -> str:
    from .report import _table

    rows = [["∞" if c["max_uncertainty"] == float("inf") else f"{c['max_uncertainty']:g}", str(c["n"]),
             _f(c["mean_abs_error"], "{:.3f}"), _f(c["max_abs_error"], "{:.3f}"),
             _f(None if c.get("coverage") is None else 100 * c["coverage"], "{:.0f}%")]
            for c in val["summary"]["heldout"]["calibration"]]
    return _table(rows, ["uncertainty ≤ (nats/token)", "predictions", "held-out MAE", "max error", "within ±u"],
                  left=())


def _choice_table(val: dict) -> list[str]:
    from .report import _table

    rows = [[r["merge"], r["task"], f"{r['acc_base']:.1f}", f"{r['acc_predicted']:.1f}", f"{r['acc_measured']:.1f}",
             f"{r['acc_base_heldout']:.1f}", f"{r['acc_measured_heldout']:.1f}"]
            for r in val["rows"] if "acc_predicted" in r]
    if not rows:
        return []
    c = val["summary"].get("choice") or {}
    note = (f"Spearman of the accuracy changes, predicted vs measured: {_f(c['eval']['spearman'], '{:.3f}')} "
            f"(evaluation), {_f(c['heldout']['spearman'], '{:.3f}')} (held-out); MAE "
            f"{c['eval']['mae_points']:.1f} points." if c else "")
    return ["<h3>Multiple choice (acc over the label words, lm-evaluation-harness style)</h3>",
            f"<p class=note>Predicted from every choice's log-likelihood under the linearised logits. {note}</p>",
            _table(rows, ["merge", "task", "base acc %", "predicted %", "measured %", "base acc, held-out %",
                          "measured, held-out %"], left=(0, 1))]


def lm_section(val: dict, figs: dict) -> list[str]:
    """The HTML of the LM validation section."""
    from .report import _img, _table

    names, inter, co = val["tasks"], val["interference"], val["coefficients"]
    s = val["summary"]
    irows = [[s_, *[f"{inter['predicted'][i][j]:+.3f} / {inter['measured'][i][j]:+.3f}" for j in range(len(names))]]
             for i, s_ in enumerate(names)]
    grid = ", ".join(f"λ={k}: {v:+.3f}" for k, v in co["grid"].items())
    return ["<h2>Merges of causal-LM tasks: predicted vs measured mean NLL</h2>",
            f"<p class=note>Change of each task's mean NLL (nats per token, negative = better) on {val['n_eval']} "
            f"evaluation and {val['n_holdout']} held-out test examples per task. A series that diverges (ρ ≥ 1) is "
            "truncated at its first order in the headline. Taylor predictor "
            f"<code>{html.escape(val.get('predictor', 'loglik'))}</code>; where its band does not trust a "
            f"prediction, {s.get('n_probed', 0)} were replaced by the probe-calibrated estimate and "
            f"{s.get('n_probe_checked', 0)} kept after the probe found no bias.</p>",
            *_img(figs.get("lm_scatter"), "predicted vs measured (nats)"), _rows_table(val), _summary_table(val),
            "<p class=note>Calibration of the trust signal on the held-out examples: error of the predictions "
            "whose uncertainty is at most the threshold, and the share within ±uncertainty.</p>", _calibration(val),
            *_choice_table(val),
            "<h3>Interference (τ_t alone on task s: predicted first order / measured)</h3>",
            _table(irows, ["task s \\ vector t", *names]),
            f"<p class=note>Off-diagonal Spearman {_f(inter.get('spearman_offdiag'), '{:.3f}')}. Coefficients: the "
            f"prediction-chosen λ* = {co['lambda_star']:g} (searched where every task's series converges: λ ≤ "
            f"{_f(co.get('lambda_converges_up_to'), '{:g}')}) measured "
            f"{co['measured_avg_at_lambda_star']['eval']:+.3f} "
            f"(held-out {co['measured_avg_at_lambda_star']['heldout']:+.3f}) average change; the measured grid: "
            f"{html.escape(grid)} (best λ = {co['grid_best_lambda']}).</p>",
            f"<p class=note>Validation time {val['timings_s']['total']:.0f} s (predictions "
            f"{val['timings_s']['predictions']:.0f} s).</p>"]
