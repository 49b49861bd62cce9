"""taskvec: fine-tune with early stopping, extract task vectors, explain interference through the
empirical NTK, and merge transformer checkpoints.

Public API (imported lazily, so ``import taskvec`` stays fast)::

    from taskvec import TaskVector, FinetuneConfig, finetune, extract_vectors, load_task, make_splits
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # tasks and models
    "Task": "taskvec.tasks", "load_task": "taskvec.tasks", "load_task_file": "taskvec.tasks",
    "make_splits": "taskvec.tasks", "Splits": "taskvec.tasks", "task_names": "taskvec.tasks",
    "Batches": "taskvec.tasks", "DEFAULT_TASKS": "taskvec.tasks",
    "TaskModel": "taskvec.modeling", "load_backbone": "taskvec.modeling", "load_tokenizer": "taskvec.modeling",
    "load_task_model": "taskvec.modeling", "resolve_model": "taskvec.modeling", "MODELS": "taskvec.modeling",
    "resolve_scope": "taskvec.scopes", "ParamSelection": "taskvec.scopes",
    # fine-tuning and task vectors
    "FinetuneConfig": "taskvec.finetune", "finetune_task": "taskvec.finetune",
    "extract_vectors": "taskvec.finetune", "evaluate": "taskvec.finetune", "results_table": "taskvec.finetune",
    "TaskVector": "taskvec.task_vector",
    "empirical_ntk": "taskvec.ntk", "jacobian_features": "taskvec.ntk", "jvp_outputs": "taskvec.ntk",
    "NTKResult": "taskvec.ntk", "spectrum_report": "taskvec.spectrum", "spectral_stopping_step": "taskvec.spectral",
    "SpectralStopping": "taskvec.spectral", "validate_run": "taskvec.validation", "MergeSpec": "taskvec.merge.memory",
    "write_report": "taskvec.report", "run_pipeline": "taskvec.pipeline",
    "validate_lm_run": "taskvec.lm_validate", "prepare_study": "taskvec.study",
    "Patience": "taskvec.stopping", "StoppingRule": "taskvec.stopping", "register_rule": "taskvec.stopping",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("merge", "finetune"):  # callable modules: taskvec.merge(...) / taskvec.finetune(...)
        return importlib.import_module(f"taskvec.{name}")
    raise AttributeError(f"module 'taskvec' has no attribute {name!r}")


__all__ = [*_EXPORTS, "merge", "finetune"]  # noqa: PLE0604
