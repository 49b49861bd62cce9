"""The ``ntk`` stage: kernels and spectra for every task of a fine-tuning run (``taskvec ntk RUN/``).

Reads the run through :class:`taskvec.runs.Run` (base model, saved heads, splits and prompts), computes each task's eNTK at θ0 with
:func:`taskvec.ntk.empirical_ntk` and writes ``RUN/ntk``. Under ``torchrun`` the kernels are computed by all
ranks together and rank 0 writes (``python -m taskvec.cli ntk RUN/`` or ``torchrun ... -m taskvec.cli ntk``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..ntk import as_batch, empirical_ntk
from ..runs import Run, open_run


def base_task_model(run, task: str, device=None) -> nn.Module:
    """θ0 for one task of a run: the run's *base* backbone with that task's saved head
    (:meth:`taskvec.runs.Run.base_task_model`)."""
    return open_run(run).base_task_model(task, device=device)


def _init_torchrun(device):
    """Under torchrun (``WORLD_SIZE`` > 1) without a process group yet: start one (NCCL on
    ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is not the CPU, else gloo).

    Returns ``(started, rank, device)``; ``device`` defaults to CUDA when available (``cuda:LOCAL_RANK``
    under torchrun), else the CPU.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if world > 1 and want_cuda and (device is None or torch.device(device).index is None):
        device = torch.device("cuda", local)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return started, rank, device


def _task_kernel(run: Run, name: str, n: int, seed: int, max_length: int | None, device, kw: dict):
    """One task's θ0 model, kernel inputs, eNTK and spectrum report."""
    from ..spectrum import spectrum_report

    kw = dict(kw)
    num_boot = kw.pop("num_boot", 100)
    batches = run.kernel_batches(name, n, seed=seed, max_length=max_length)
    batch = as_batch(list(batches))
    model = run.base_task_model(name, device=device)
    res = empirical_ntk(model, batch, seed=seed, **kw)
    rep = spectrum_report(res, labels=batch["labels"].numpy(), num_boot=num_boot, seed=seed)
    rep.meta.update({"task": name, "examples": list(batches.indices), "base_model": run.base_model,
                     "prompt": run.task(name).prompt})
    return model, batch, res, rep


def _summary(rep, res) -> dict:
    return {"alpha": rep.uncentered.decay.alpha if rep.uncentered.decay else None,
            "participation_ratio": rep.uncentered.ranks.participation_ratio,
            "alignment": rep.alignment, "kernel_ridge_cv_accuracy": (rep.kernel_ridge or {}).get("cv_accuracy"),
            "seconds": res.seconds}


def _cross_kernels(models: dict, inputs: dict, output: str, kw: dict, seed: int) -> dict:
    """Trace cross-task kernels of every pair (full kernels for logits of different label counts)."""
    out = {}
    names = list(models)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            o_a, o_b = models[a].spec.num_labels, models[b].spec.num_labels
            kind = "trace" if (o_a == o_b or output != "logits") else "full"
            out[(a, b)] = empirical_ntk(models[a], inputs[a], inputs[b], model2=models[b], output=output,
                                        kernel=kind, groups=False, seed=seed,
                                        **{k: v for k, v in kw.items() if k not in ("output", "kernel")})
    return out


def _write(dest: Path, kernels: dict, reports: dict, cross: dict, summary: dict, plots: bool) -> None:
    """Everything the stage computed, into ``dest`` (a fresh temporary directory)."""
    from ..io import write_json

    for name, res in kernels.items():
        res.save(dest / f"{name}.safetensors")
        write_json(dest / f"{name}.spectrum.json", reports[name].to_json())
    if cross:
        (dest / "cross").mkdir()
        for (a, b), r in cross.items():
            r.save(dest / "cross" / f"{a}__{b}.safetensors")
    write_json(dest / "summary.json", summary)
    if plots:
        from ..ntk_plots import plot_effective_ranks, plot_group_traces, plot_spectrum

        reps = {t: r.to_json() for t, r in reports.items()}
        plot_spectrum(reps, dest / "spectrum.png")
        plot_group_traces(reps, dest / "group_traces.png")
        plot_effective_ranks(reps, dest / "effective_ranks.png")


def run_ntk(run, out=None, n: int = 512, params: str | None = None, mode: str = "exact", output: str = "logits",
            kernel: str = "full", cross: bool = True, sketch_dim: int = 8192, seed: int = 0, device=None,
            num_boot: int = 100, max_length: int | None = None, plots: bool = True,
            overwrite: bool = False) -> dict:
    """Kernels and spectra for every task of a run (``taskvec ntk RUN/``), read through
    :class:`taskvec.runs.Run`.

    ``params``: the kernel's parameter selection (default :meth:`Run.kernel_params`: the run's scope, or the
    tensors its task vectors change). For each task: ``n`` training examples (:meth:`Run.sample`, the sampler every stage uses), read through
    the task's prompt and truncated at the run's ``max_length`` (or ``max_length``); θ0 = base backbone + the
    task's head; the eNTK (``kernel``, with per-group kernels) saved as ``OUT/<task>.safetensors`` (+ meta
    JSON) and its :class:`~taskvec.spectrum.SpectrumReport` as ``OUT/<task>.spectrum.json``; with ``cross``
    the trace cross-task kernels ``OUT/cross/<a>__<b>.safetensors`` (tasks with different label counts:
    full kernel); ``OUT/summary.json``; plots (``spectrum.png``, ``group_traces.png``,
    ``effective_ranks.png``). ``out`` defaults to ``RUN/ntk``; it is written atomically (nothing appears
    until every kernel is done) and an existing one is refused unless ``overwrite``. Returns
    ``{task: spectrum summary dict}``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the kernels are computed by all ranks together (NCCL with
    ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU; see :func:`empirical_ntk`) and only
    rank 0 writes files.
    """
    from ..io import atomic_dir, check_output

    run = open_run(run, require="finetune")
    out = Path(out) if out is not None else run.stage_dir("ntk")
    check_output(out, overwrite)
    if params is None:  # the run's scope; for LoRA runs and studies, the tensors the task vectors change
        params = run.kernel_params() if all(run.has_vector(t) for t in run.names) else run.scope
    started, rank, device = _init_torchrun(device)
    kw = {"params": params, "output": output, "mode": mode, "kernel": kernel, "sketch_dim": sketch_dim}
    try:
        models, inputs, kernels, reports, summary = {}, {}, {}, {}, {}
        for name in run.names:
            model, batch, res, rep = _task_kernel(run, name, n, seed, max_length, device, dict(kw, num_boot=num_boot))
            models[name], inputs[name], kernels[name], reports[name] = model, batch, res, rep
            summary[name] = _summary(rep, res)
        pairs = _cross_kernels(models, inputs, output, kw, seed) if cross and len(models) > 1 else {}
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:  # under torchrun every rank holds the same kernels; one writes them
        with atomic_dir(out, overwrite) as tmp:
            _write(tmp, kernels, reports, pairs, summary, plots)
    return summary
