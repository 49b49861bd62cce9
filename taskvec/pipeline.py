"""``taskvec run CONFIG``: the whole pipeline, each stage cached and resumable.

Stages, in order (a config lists the ones to run):

``finetune``  fine-tune the base on every task with early stopping (:mod:`taskvec.finetune`)
``vectors``   extract task vectors into ``OUT/vectors/`` (:class:`taskvec.TaskVector`)
``ntk``       empirical NTK of the base on each task and its spectrum (:mod:`taskvec.ntk`)
``merge``     write each configured merge as a model directory with the tasks' heads (:mod:`taskvec.merge`)
``validate``  predict every merge from the linearised model, measure it, explain it through the eNTK
              eigenspaces, choose coefficients from predictions, build the NTK-aware merge
              (:mod:`taskvec.interference`)
``report``    ``OUT/report/report.html`` + PNG figures + ``OUT/results.json`` (:mod:`taskvec.report`)

A stage's inputs (its config section and the outputs of the stages before it) are hashed into
``OUT/stages.json``; a stage whose inputs changed is recomputed instead of reused. The packaged
``default`` config (``taskvec/configs/default.yaml``) is the README's main job.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from importlib import resources
from pathlib import Path

import yaml

from .errors import TaskvecError
from .io import write_json

STAGES = ["finetune", "vectors", "ntk", "merge", "validate", "report"]
TOP_KEYS = {"model", "tasks", "stages", "finetune", "ntk", "merge", "validate", "report"}


def merge_specs(cfg: dict) -> list:
    """The config's merges as :class:`~taskvec.interference.MergeSpec` (``merge.methods`` entries)."""
    from .interference import MergeSpec

    specs = []
    for i, m in enumerate((cfg.get("merge") or {}).get("methods", [])):
        m = dict(m)
        if "method" not in m:
            raise TaskvecError(f"merge.methods[{i}] has no 'method'")
        method = m.pop("method")
        name = m.pop("name", None) or method + "".join(f" {k}={v}" for k, v in m.items())
        specs.append(MergeSpec(name, method, m))
    return specs


def load_config(config) -> dict:
    """A pipeline config from a dict, a YAML path, or a packaged name (``default``)."""
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        p = Path(str(config))
        if p.exists():
            cfg = yaml.safe_load(p.read_text()) or {}
        else:
            packaged = resources.files("taskvec") / "configs" / f"{config}.yaml"
            if not packaged.is_file():
                names = sorted(f.name[:-5] for f in (resources.files("taskvec") / "configs").iterdir()
                               if f.name.endswith(".yaml"))
                raise TaskvecError(f"config {config!r} is neither a file nor a packaged config ({', '.join(names)})")
            cfg = yaml.safe_load(packaged.read_text())
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise TaskvecError(f"unknown config keys {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    stages = cfg.setdefault("stages", list(STAGES))
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise TaskvecError(f"unknown stages {bad}; valid stages: {STAGES}")
    cfg.setdefault("model", "minilm")
    if not cfg.get("tasks"):
        from .tasks import DEFAULT_TASKS

        cfg["tasks"] = list(DEFAULT_TASKS)
    return cfg


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_pipeline(config="default", out="runs/default", overwrite: bool = False, stages=None) -> dict:
    """Run the configured stages into ``out``; returns the stage summaries (also in ``OUT/pipeline.json``;
    the report stage writes every number to ``OUT/results.json``)."""
    from .finetune import FinetuneConfig, extract_vectors, finetune, results_table
    from .tasks import load_task

    cfg = load_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in cfg["stages"] if stages is None or s in stages]
    if stages:
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise TaskvecError(f"unknown stages {bad}; valid stages: {STAGES}")
    tasks = [load_task(t) for t in cfg["tasks"]]  # fail early on unknown task names
    state_path = out / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.exists() and not overwrite else {}
    results = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").exists() else {}
    upstream = _hash({"model": cfg["model"], "tasks": cfg["tasks"]})
    for stage in STAGES:
        key = _hash({"up": upstream, "cfg": cfg.get(stage, {})})
        if stage not in todo:
            upstream = _hash([upstream, key])
            continue
        stale = state.get(stage) != key
        t0 = time.time()
        print(f"== stage {stage}{' (inputs changed: recomputing)' if stale and stage in state else ''}")
        if stage == "finetune":
            fcfg = FinetuneConfig(**cfg.get("finetune", {}))
            res = finetune(cfg["model"], tasks, out, fcfg, overwrite=overwrite or stale)
            print(results_table(res))
            results["finetune"] = {"table": results_table(res),
                                   "tasks": {r.task: {k: v for k, v in r.__dict__.items() if k != "curve"}
                                             for r in res}}
        elif stage == "vectors":
            vs = extract_vectors(out, overwrite=overwrite or stale)
            from .task_vector import TaskVector

            names = list(vs)
            results["vectors"] = {"norms": {n: vs[n].norm() for n in names}, "tasks": names,
                                  "cosine": TaskVector.cosine_matrix(vs.values()).tolist()}
        elif stage == "ntk":
            from .ntk import run_ntk

            results["ntk"] = run_ntk(out, **cfg.get("ntk", {}))
        elif stage == "merge":
            from .merge import merge

            written = {}
            for spec in merge_specs(cfg):
                if spec.method == "ntk_aware":
                    continue  # built in memory by the validate stage
                dest = out / "merges" / re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name).strip("_")
                if dest.exists() and not (overwrite or stale):
                    written[spec.name] = str(dest)
                    continue
                merge({"run": str(out), "method": spec.method, "parameters": spec.params}, dest,
                      overwrite=True, show_progress=False)
                written[spec.name] = str(dest)
            results["merge"] = written
        elif stage == "validate":
            from .interference import validate_run

            vcfg = dict(cfg.get("validate") or {})
            res = validate_run(out, merges=merge_specs(cfg) or None, **vcfg)
            results["validate"] = {"summary": res["summary"], "coefficients": {
                k: v for k, v in res["coefficients"].items() if k != "grid"}, "path": str(out / "validation")}
        elif stage == "report":
            from .report import write_report

            results["report"] = str(write_report(out))
        state[stage] = key
        write_json(state_path, state)
        results.setdefault("wall_time_s", {})[stage] = time.time() - t0
        write_json(out / "pipeline.json", results)
        upstream = _hash([upstream, key])
    return results
