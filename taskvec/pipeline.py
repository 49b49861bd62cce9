"""``taskvec run CONFIG``: the whole pipeline, each stage cached and resumable.

Stages, in order (a config lists the ones to run):

``finetune``  fine-tune the base on every task with early stopping (:mod:`taskvec.finetune`)
``vectors``   extract task vectors into ``OUT/vectors/`` (:class:`taskvec.TaskVector`)
``ntk``       empirical NTK of the base on each task and its spectrum (:mod:`taskvec.ntk`)
``merge``     merge the task vectors with each configured method and evaluate every task on its test
              split with its own head (:mod:`taskvec.merge`)

A stage's inputs (its config section and the outputs of the stages before it) are hashed into
``OUT/stages.json``; a stage whose inputs changed is recomputed instead of reused. The packaged
``default`` config (``taskvec/configs/default.yaml``) is the README's main job.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path

import yaml

from .errors import TaskvecError
from .io import write_json

STAGES = ["finetune", "vectors", "ntk", "merge"]
TOP_KEYS = {"model", "tasks", "stages", "finetune", "ntk", "merge"}


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
    """Run the configured stages into ``out``; returns the results dict also written to ``OUT/results.json``."""
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
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
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

            results["ntk"] = run_ntk(out, overwrite=overwrite or stale, **cfg.get("ntk", {}))
        elif stage == "merge":
            from .evaluation import merge_and_evaluate

            results["merge"] = merge_and_evaluate(out, cfg.get("merge", {}), overwrite=overwrite or stale)
        state[stage] = key
        write_json(state_path, state)
        results.setdefault("wall_time_s", {})[stage] = time.time() - t0
        write_json(out / "results.json", results)
        upstream = _hash([upstream, key])
    return results
