"""The vectors stage: τ_t = θ_t − θ0 for every fine-tuned task of a run (``taskvec vectors RUN/``)."""

from __future__ import annotations

import logging

from ..runs import open_run

log = logging.getLogger(__name__)


def extract_vectors(run, overwrite: bool = False) -> dict:
    """Extract every task's vector into the run (``RUN/vectors/<task>.safetensors``, :meth:`Run.vector_path`).

    LoRA runs use the exact adapter product (``TaskVector.from_peft``); other scopes the difference of the
    fine-tuned and base tensors in the run's scope. An existing vector is read back unless ``overwrite``.
    Returns ``{task: TaskVector}``.
    """
    from ..task_vector import TaskVector

    run = open_run(run, require="finetune")
    out = {}
    for name in run.names:
        path = run.vector_path(name)
        if path.exists() and not overwrite:
            out[name] = TaskVector.load(path)
            continue
        rt = run.task(name)
        if rt.adapter_dir is not None and (run.scope == "lora" or run.kind == "study"):
            tv = TaskVector.from_peft(rt.adapter_dir, base=run.base_model, task=name)
            tv.base_model = run.base_model
        elif run.kind == "study":  # a fine-tuned checkpoint made elsewhere
            tv = TaskVector.from_models(run.base_model, rt.model_dir, scope=run.scope, task=name)
            tv.base_model = run.base_model
        else:  # a taskvec task-model directory
            tv = TaskVector.from_models(run.base_model, rt.head_dir, scope=run.scope, task=name)
        tv.save(path, overwrite=True)
        log.info("task vector %s: ‖τ‖ = %.4g -> %s", name, tv.norm(), path)
        out[name] = tv
    return out
