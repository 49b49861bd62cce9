"""The merge a validation recommends, written to disk (``taskvec validate RUN --write-best DIR``).

The recommendation is the **best measured** merge: of every merge the validation built with per-task
numbers — the configured merges (task arithmetic, TIES, TSV, RegMean, Fisher, ...), the NTK-aware merges and
task arithmetic at the prediction-chosen λ*, task arithmetic at the measured global-λ grid's best λ, and
task arithmetic with the prediction-chosen global and per-task coefficients — the one with the highest
measured average normalised accuracy on the evaluation subset (ties: the first in that order).

The merge is written by :func:`taskvec.merge.merge` from an ordinary merge config over the run (``run:``
with the method and its parameters; per-task coefficients as per-task weights; the NTK-aware ones with the
validation's rank and kernel examples), so the directory is a normal merged directory (sharded safetensors,
the tasks' heads, ``merge_config.yaml``) whose model card lists the predicted and measured per-task numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TaskvecError


def candidates(results: dict) -> list[dict]:
    """Every merge of a validation result with per-task numbers: ``{name, method, params, tasks (per-task
    weights or None), per_task, measured, predicted}`` (averages of the normalised accuracies)."""
    out = []
    for m in results.get("merges", []):
        out.append({"name": m["name"], "method": m["method"], "params": dict(m.get("params") or {}), "tasks": None,
                    "per_task": m["per_task"]})
    co = results.get("coefficients", {})
    if co.get("grid_best_per_task"):
        out.append({"name": f"task_arithmetic λ={co['grid_best_lambda']:g} (the measured grid's best)",
                    "method": "task_arithmetic", "params": {"lambda": float(co["grid_best_lambda"])}, "tasks": None,
                    "per_task": co["grid_best_per_task"]})
    for label, ch in (co.get("chosen") or {}).items():
        out.append({"name": f"task_arithmetic, prediction-chosen {label.replace('_', '-')} coefficients",
                    "method": "task_arithmetic", "params": {"lambda": 1.0},
                    "tasks": {t: {"weight": float(c)} for t, c in ch["coefficients"].items()},
                    "per_task": ch["per_task"]})
    for c in out:
        c["measured"] = float(np.mean([e["normalized_measured"] for e in c["per_task"].values()]))
        c["predicted"] = float(np.mean([e["normalized_predicted"] for e in c["per_task"].values()]))
    return out


def recommended(results: dict) -> dict:
    """The best measured candidate (see the module docstring); :class:`TaskvecError` when there is none."""
    cands = candidates(results)
    if not cands:
        raise TaskvecError("the validation results have no measured merges to recommend")
    return max(cands, key=lambda c: c["measured"])  # max keeps the first of equal values


def merge_config(run_root, cand: dict, results: dict) -> dict:
    """The :func:`taskvec.merge.merge` config that writes candidate ``cand`` of a validation of ``run_root``."""
    from ..merge.data_aware import NTK_AWARE

    params = dict(cand["params"])
    if cand["method"] in NTK_AWARE:
        eig = results.get("eigen") or {}
        params |= {"rank": int(eig["rank"]), "n_kernel": int(eig["n_kernel"])}
    cfg = {"run": str(run_root), "method": cand["method"], "parameters": params}
    if cand["tasks"] is not None:
        cfg["tasks"] = cand["tasks"]
    return cfg


def card_section(cand: dict, results: dict, recommended: bool = True) -> str:
    """Markdown for the model card: its predicted and measured per-task accuracies (and, for the
    recommended merge, why it was chosen)."""
    n_eval = results.get("n_eval", {})
    avg = f"({100 * cand['measured']:.2f}%; predicted {100 * cand['predicted']:.2f}%)"
    why = (f"Recommended by `taskvec validate` of `{results.get('run')}`: **{cand['name']}**, the best measured "
           f"average normalised accuracy {avg} of the merges it built and measured" if recommended else
           f"Measured by `taskvec validate` of `{results.get('run')}` as **{cand['name']}**: average normalised "
           f"accuracy {avg}")
    lines = ["## Validation", "", why + " (evaluation subset of each task's test split).", "",
             "| task | examples | base acc | predicted acc | measured acc | normalised (measured) | trusted |",
             "|---|---|---|---|---|---|---|"]
    for t, e in cand["per_task"].items():
        lines.append(f"| {t} | {n_eval.get(t, '')} | {100 * e['base']:.2f} | {100 * e['predicted']:.2f} | "
                     f"{100 * e['measured']:.2f} | {100 * e['normalized_measured']:.2f}% | "
                     f"{'yes' if e.get('trusted') else 'no'} |")
    others = sorted(candidates(results), key=lambda c: -c["measured"])
    lines += ["", "Other merges measured (average normalised accuracy, measured / predicted): "
              + "; ".join(f"{c['name']} {100 * c['measured']:.2f}% / {100 * c['predicted']:.2f}%" for c in others
                          if c["name"] != cand["name"]) + "."]
    return "\n".join(lines)


def annotate_cards(results: dict, dirs: dict) -> list[str]:
    """Append the "Validation" section (predicted and measured per-task numbers) to the model card
    ``README.md`` of each merged directory ``dirs[name]`` whose merge validation measured under ``name``
    (the pipeline's merge stage writes them before the validate stage runs). Each card is rewritten
    atomically, a previous "Validation" section replaced. Returns the names annotated."""
    from ..io import atomic_file

    rows = {c["name"]: c for c in candidates(results)}
    done = []
    for name, d in dirs.items():
        card = Path(d) / "README.md"
        if name not in rows or not card.is_file():
            continue
        text = card.read_text().split("\n## Validation\n")[0].rstrip("\n")
        with atomic_file(card) as tmp:
            tmp.write_text(text + "\n\n" + card_section(rows[name], results, recommended=False) + "\n")
        done.append(name)
    return done


def write_best(run, out, results: dict | None = None, overwrite: bool = False, device: str = "cpu"):
    """Write the merge a validation of ``run`` recommends to ``out`` (atomically, with the tasks' heads and a
    model card holding its predicted and measured per-task numbers). ``results``: the validation result
    (default: the run's ``validation/results.json``). Returns ``(MergeResult, candidate)``."""
    from ..merge import merge
    from ..runs import open_run

    run = open_run(run, require="vectors")
    if results is None:
        results = run.validation_results()
        if results is None:
            raise TaskvecError(f"{run.root}: no validation results ({run.stage_dir('validate') / 'results.json'}); "
                               f"run `taskvec validate {run.root}` first")
    cand = recommended(results)
    res = merge(merge_config(run.root, cand, results), Path(out), overwrite=overwrite, device=device,
                show_progress=False, card_extra=card_section(cand, results))
    return res, cand


__all__ = ["annotate_cards", "candidates", "card_section", "merge_config", "recommended", "write_best"]
