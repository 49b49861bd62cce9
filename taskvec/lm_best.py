"""The merge an LM validation recommends, written to disk (``taskvec validate LM_RUN --write-best DIR``).

The LM counterpart of :mod:`taskvec.validation.best`. The recommendation is the **best measured** merge of
:func:`taskvec.lm_validate.validate_lm_run`: of the configured merges (task arithmetic at each λ, TIES, ...)
and task arithmetic at the prediction-chosen λ*, the one whose measured mean-NLL change, averaged over the
tasks' evaluation examples, is lowest (ties: the first in that order). It is written by
:func:`taskvec.merge.merge` from an ordinary merge config over the run, so the directory is a normal merged
directory (safetensors, the tasks' LM heads, ``merge_config.yaml``) whose model card lists the predicted and
measured per-task changes in nats per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import TaskvecError


def candidates(results: dict) -> list[dict]:
    """``{name, method, params, measured (average change, nats per token), rows}`` for every merge measured."""
    by_merge: dict[str, list] = {}
    for r in results.get("rows", []):
        by_merge.setdefault(r["merge"], []).append(r)
    out = [{"name": m["name"], "method": m["method"], "params": dict(m["params"]),
            "measured": float(np.mean([r["measured"] for r in by_merge[m["name"]]])), "rows": by_merge[m["name"]]}
           for m in results.get("merges", []) if m["name"] in by_merge]
    co = results.get("coefficients") or {}
    if co.get("lambda_star") is not None:
        out.append({"name": f"task_arithmetic, prediction-chosen λ*={co['lambda_star']:g}",
                    "method": "task_arithmetic", "params": {"lambda": float(co["lambda_star"])},
                    "measured": float(co["measured_avg_at_lambda_star"]["eval"]), "rows": []})
    return out


def recommended(results: dict) -> dict:
    """The candidate with the lowest measured average change; :class:`TaskvecError` when there is none."""
    cands = candidates(results)
    if not cands:
        raise TaskvecError("the LM validation results have no measured merges to recommend (saved before "
                           "merges were recorded? run `taskvec validate RUN --overwrite` again)")
    return min(cands, key=lambda c: c["measured"])  # min keeps the first of equal values


def card_section(cand: dict, results: dict) -> str:
    """Markdown for the model card: why this merge, and its per-task predicted and measured changes."""
    lines = ["## Validation", "",
             f"Recommended by `taskvec validate` of `{results.get('run')}`: **{cand['name']}**, the lowest measured "
             f"mean-NLL change averaged over the tasks ({cand['measured']:+.3f} nats per token, on {results['n_eval']} "
             "evaluation examples per task) of the merges it built and measured.", ""]
    if cand["rows"]:
        lines += ["| task | base NLL | predicted change | measured change | measured, held-out | predictor |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['base_nll']:.3f} | {r['predicted']:+.3f} | {r['measured']:+.3f} | "
                  f"{r['measured_heldout']:+.3f} | {r['predictor']} |" for r in cand["rows"]]
    others = sorted(candidates(results), key=lambda c: c["measured"])
    lines += ["", "Other merges measured (average mean-NLL change, nats per token): "
              + "; ".join(f"{c['name']} {c['measured']:+.3f}" for c in others if c["name"] != cand["name"]) + "."]
    return "\n".join(lines)


def write_best(run, out, results: dict | None = None, overwrite: bool = False, device: str = "cpu"):
    """Write the merge an LM validation of ``run`` recommends to ``out`` (atomically, with the tasks' heads
    and a model card). ``results``: default the run's ``validation/lm_results.json``. Returns
    ``(MergeResult, candidate)``."""
    from .merge import merge
    from .runs import open_run

    run = open_run(run, require="vectors")
    if results is None:
        results = run.lm_validation_results()
        if results is None:
            raise TaskvecError(f"{run.root}: no LM validation results "
                               f"({run.stage_dir('validate') / 'lm_results.json'}); run `taskvec validate "
                               f"{run.root}` first")
    cand = recommended(results)
    cfg = {"run": str(run.root), "method": cand["method"], "parameters": cand["params"]}
    res = merge(cfg, Path(out), overwrite=overwrite, device=device, show_progress=False,
                card_extra=card_section(cand, results))
    return res, cand
