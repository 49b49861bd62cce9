"""``taskvec run CONFIG``: the whole pipeline, each stage cached and resumable.

Stages, in order (a config lists the ones to run):

``finetune``  fine-tune the base on every task with early stopping (:mod:`taskvec.finetune`); with a
              ``study`` (checkpoints made elsewhere, :mod:`taskvec.study`) in place of ``model``/``tasks``:
              check the study and write it as the run
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
import logging
import re
import time
from importlib import resources
from pathlib import Path

import yaml

from .errors import TaskvecError
from .io import write_json

log = logging.getLogger(__name__)

STAGES = ["finetune", "vectors", "ntk", "merge", "validate", "report"]
TOP_KEYS = {"model", "tasks", "study", "stages", "finetune", "ntk", "merge", "validate", "report"}


def merge_specs(cfg: dict) -> list:
    """The config's merges as :class:`~taskvec.merge.memory.MergeSpec` (``merge.methods`` entries)."""
    from .merge.memory import MergeSpec

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
    if cfg.get("study") is not None:  # checkpoints made elsewhere (taskvec.study) instead of fine-tuning
        both = sorted({"model", "tasks", "finetune"} & set(cfg))
        if both:
            raise TaskvecError(f"a config with 'study' names its base model and tasks there; remove {both}")
        return cfg
    cfg.setdefault("model", "minilm")
    if not cfg.get("tasks"):
        from .tasks import DEFAULT_TASKS

        cfg["tasks"] = list(DEFAULT_TASKS)
    return cfg


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _merge_stage(cfg: dict, out: Path, redo: bool) -> dict:
    """Write each configured merge (not the NTK-aware ones: the validate stage builds those in memory)."""
    from .merge import merge
    from .runs import stage_path

    written = {}
    for spec in merge_specs(cfg):
        if spec.method in ("ntk_aware", "ntk_aware_harmful"):
            continue
        dest = stage_path(out, "merge") / (re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name).strip("_"))
        if not dest.exists() or redo:
            merge({"run": str(out), "method": spec.method, "parameters": spec.params}, dest,
                  overwrite=True, show_progress=False)
        written[spec.name] = str(dest)
    return written


def _run_stage(stage: str, cfg: dict, out: Path, tasks: list, redo: bool):
    """Run one stage into ``out``; ``redo``: recompute what exists. Returns the stage's summary."""
    from .finetune import FinetuneConfig, finetune, results_table
    from .stages.vectors import extract_vectors

    if stage == "finetune" and cfg.get("study") is not None:  # a study: its checkpoints replace fine-tuning
        from .study import prepare_study

        run = prepare_study(cfg["study"], out, overwrite=redo)
        return {"study": True, "tasks": {t: run.description()["sources"][t] for t in run.names}}
    if stage == "finetune":
        res = finetune(cfg["model"], tasks, out, FinetuneConfig(**cfg.get("finetune", {})), overwrite=redo)
        log.info("fine-tuning results:\n%s", results_table(res))
        return {"table": results_table(res),
                "tasks": {r.task: {k: v for k, v in r.__dict__.items() if k != "curve"} for r in res}}
    if stage == "vectors":
        from .task_vector import TaskVector

        vs = extract_vectors(out, overwrite=redo)
        names = list(vs)
        return {"norms": {n: vs[n].norm() for n in names}, "tasks": names,
                "cosine": TaskVector.cosine_matrix(vs.values()).tolist()}
    if stage == "ntk":
        from .stages.ntk import run_ntk

        return run_ntk(out, overwrite=True, **cfg.get("ntk", {}))
    if stage == "merge":
        return _merge_stage(cfg, out, redo)
    if stage == "validate":
        from .runs import stage_path
        from .validation import validate_run

        res = validate_run(out, merges=merge_specs(cfg) or None, overwrite=True, **dict(cfg.get("validate") or {}))
        return {"summary": res["summary"], "path": str(stage_path(out, "validate")),
                "coefficients": {k: v for k, v in res["coefficients"].items() if k != "grid"}}
    if stage == "report":
        from .report import write_report

        return str(write_report(out, overwrite=True))
    raise TaskvecError(f"unknown stage {stage!r}; valid stages: {STAGES}")  # pragma: no cover


def run_pipeline(config="default", out="runs/default", overwrite: bool = False, stages=None) -> dict:
    """Run the configured stages into ``out``; returns the stage summaries (also in ``OUT/pipeline.json``;
    the report stage writes every number to ``OUT/results.json``).

    A stage whose inputs (its config section and every stage before it) are unchanged since it last
    finished is reused; one whose inputs changed is recomputed, and so is everything after it.
    """
    from .tasks import load_task

    cfg = load_config(config)
    if stages:
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise TaskvecError(f"unknown stages {bad}; valid stages: {STAGES}")
    todo = [s for s in cfg["stages"] if stages is None or s in stages]
    if cfg.get("study") is not None:
        from .study import load_study

        study_record = load_study(cfg["study"]).to_dict()  # fail early on a malformed study
        tasks = []
    else:
        tasks = [load_task(t) for t in cfg["tasks"]]  # fail early on unknown task names
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.exists() and not overwrite else {}
    results = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").exists() else {}
    upstream = (_hash({"model": cfg["model"], "tasks": cfg["tasks"]}) if cfg.get("study") is None
                else _hash({"study": study_record}))
    for stage in STAGES:
        key = _hash({"up": upstream, "cfg": cfg.get(stage, {})})
        upstream = _hash([upstream, key])
        if stage not in todo:
            continue
        stale = state.get(stage) != key
        if not (overwrite or stale) and stage in results and stage in ("ntk", "validate", "report"):
            log.info("== stage %s: inputs unchanged, reusing %s", stage, out)
            continue
        t0 = time.time()
        log.info("== stage %s%s", stage, " (inputs changed: recomputing)" if stale and stage in state else "")
        results[stage] = _run_stage(stage, cfg, out, tasks, redo=overwrite or stale)
        state[stage] = key
        write_json(state_path, state)
        results.setdefault("wall_time_s", {})[stage] = time.time() - t0
        write_json(out / "pipeline.json", results)
    return results
