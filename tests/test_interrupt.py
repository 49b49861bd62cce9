"""Interrupted commands (docs/reliability.md): ``taskvec run`` stopped by SIGINT or SIGKILL during
fine-tuning, merging and validation leaves nothing that a later command could take for a result, and the
same command run again finishes with the results of an uninterrupted run.

The interruption points are exact, not timed: the test-only hook of :mod:`taskvec.io`
(``TASKVEC_TEST_HOLD=GLOB#N``) stops the N-th atomic write whose destination matches ``GLOB`` once its
content is written and before it is renamed into place, and writes ``TASKVEC_TEST_HOLD_READY``; the test
then sends the signal. The points: the second resumable fine-tuning checkpoint of each task (so a rerun
resumes mid-task from the first), each merged model directory, and the validation results file.

The reference is the same pipeline run uninterrupted into the same path (then moved aside), so paths
recorded in the outputs match too: the task vectors and merged weights must be bit-identical, the
fine-tuning results (minus wall times) and the validation summary equal.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import toy_task

from taskvec.io import exclusive_lock, lock_file

GUARD_S = 300  # fails a hung test; never reached when things work

#: keys whose values are wall-clock times, or derived from them (differ between any two runs)
TIME_KEYS = {"wall_time_s", "timings_s", "seconds", "bases_seconds", "eigen_seconds", "compute"}


def _config(tmp: Path, model) -> Path:
    paths = []
    for name, seed in (("alpha", 0), ("beta", 1)):
        t = toy_task(name, n=90, seed=seed)
        p = tmp / f"{name}.csv"
        p.write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
        paths.append(str(p))
    cfg = {"model": str(model), "tasks": paths, "stages": ["finetune", "vectors", "merge", "validate"],
           # no early stop: every task runs its 6 steps (8 batches an epoch), with checkpoints at steps 2 and 4
           "finetune": {"max_steps": 6, "eval_every": 2, "lr": 3e-3, "test_size": 20, "val_size": 10,
                        "batch_size": 8, "early_stopping": [], "device": "cpu"},
           "merge": {"methods": [{"method": "task_arithmetic", "lambda": 0.5},
                                 {"method": "ties", "density": 0.5}]},
           "validate": {"n_eval": 12, "n_kernel": 6, "rank": 2, "lambdas": [0.5, 1.0], "ntk_aware": False,
                        "n_holdout": 0, "progress": False, "device": "cpu"}}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    for k in ("RANK", "TASKVEC_TEST_HOLD", "TASKVEC_TEST_HOLD_READY"):
        if k not in extra:
            env.pop(k, None)
    return env


def _cli(*args, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "taskvec.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _visible(root: Path) -> dict[str, Path]:
    """The files of a run that a command could read as results (no part of their path hidden)."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def _hidden(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def _no_times(obj):
    if isinstance(obj, dict):
        return {k: _no_times(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [_no_times(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("| task |"):  # the fine-tuning table: drop its wall column
        return "\n".join(row.rsplit("|", 2)[0] for row in obj.splitlines())
    return obj


def _content(p: Path):
    """A file's content for comparing runs: JSON without wall times, anything else its bytes."""
    if p.suffix == ".json":
        return _no_times(json.loads(p.read_text()))
    if p.name == "README.md":  # a merge's model card: the date it was written
        return re.sub(r" on \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", " on DATE.", p.read_text())
    return p.read_bytes()


def _same(p: Path, q: Path) -> bool:
    """Two files of two runs hold the same result: equal bytes (JSON: equal but for wall times)."""
    return _close(_content(p), _content(q))


def _close(a, b) -> bool:
    """Equal, except that two floats may differ in their last bits (relative 1e-12): a number recomputed
    in another process (a cosine, an eigenspace energy: threaded reductions) can, although the tensors it
    is computed from are bit-identical. Anything a resume got wrong differs by far more."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=0)
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    """The pipeline run uninterrupted, in a subprocess like the interrupted ones, into ``root/run``; moved to
    ``root/reference`` so the interrupted runs write the same path. Returns ``(root, config)``."""
    root = tmp_path_factory.mktemp("interrupt")
    cfg = _config(root, tiny_bert)
    proc = _cli("run", cfg, "--out", root / "run", env=_env())
    _, err = proc.communicate(timeout=GUARD_S)
    assert proc.returncode == 0, err
    os.rename(root / "run", root / "reference")
    return root, cfg


def _interrupt(root: Path, cfg: Path, hold: str, sig: int) -> None:
    """Run the pipeline into ``root/run`` until the hook holds at ``hold``; send ``sig``; check what is left."""
    out, ready = root / "run", root / "ready"
    ready.unlink(missing_ok=True)
    proc = _cli("run", cfg, "--out", out, env=_env(TASKVEC_TEST_HOLD=hold, TASKVEC_TEST_HOLD_READY=str(ready)))
    deadline = time.monotonic() + GUARD_S
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before reaching {hold}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never reached {hold}")
        time.sleep(0.05)
    held = Path(ready.read_text())
    assert re.fullmatch(hold.replace("*", ".*").split("#")[0], str(held)), held
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=GUARD_S)
    if sig == signal.SIGINT:  # one line, no traceback, the conventional exit code
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("taskvec run: interrupted"), err
        assert not lock_file(out).exists()  # released and removed
        assert not [h for h in _hidden(out) if ".tmp-" in h or ".old-" in h], _hidden(out)
    else:
        assert proc.returncode == -signal.SIGKILL
    with exclusive_lock(out, "test"):  # whatever the signal, the lock is free again
        pass
    # nothing half-written where a command would read it: every visible file is a finished result (the
    # reference's, or the run's bookkeeping), and the output being written when the signal came is absent
    ref = _visible(root / "reference")
    for name, p in _visible(out).items():
        assert name in ref, f"{name} left behind"
        if p.name == "README.md":  # a merge's model card: the validate stage adds its measured numbers later
            continue
        if p.suffix != ".json" or name.startswith(("finetune/", "vectors/", "merges/")):
            assert _same(p, ref[name]), f"{name} differs from the uninterrupted run's"
    if not any(part.startswith(".") for part in held.relative_to(out).parts):
        assert not held.exists(), f"{held} was written although interrupted"


def _rerun_equals_reference(root: Path, cfg: Path) -> None:
    out = root / "run"
    proc = _cli("run", cfg, "--out", out, env=_env())
    _, err = proc.communicate(timeout=GUARD_S)
    assert proc.returncode == 0, err
    ref, got = _visible(root / "reference"), _visible(out)
    assert sorted(got) == sorted(ref)
    for name in ref:  # task vectors and merged weights bit-identical; results equal but for wall times
        assert _same(got[name], ref[name]), f"{name} differs from the uninterrupted run's"
    assert any(n.startswith("vectors/") and n.endswith(".safetensors") for n in ref)
    assert any(n.startswith("merges/") and n.endswith(".safetensors") for n in ref)
    assert "validation/results.json" in ref and "finetune/summary.json" in ref
    # nothing left by the killed processes: no temporaries, no superseded copies, no lock file
    assert [h for h in _hidden(out) if ".tmp-" in h or ".old-" in h or h.endswith(".lock")] == []
    assert not lock_file(out).exists()
    shutil.rmtree(out)


def test_an_interrupted_pipeline_resumes_to_the_uninterrupted_results(reference):
    """One run interrupted six times, by SIGINT and by SIGKILL during fine-tuning, merging and validation,
    each rerun resuming where the last stopped; then a rerun finishes with the uninterrupted results."""
    root, cfg = reference
    points = [  # where, and the signal; each rerun resumes from what the one before left
        ("*/finetune/*.alpha.ckpt*/state.json#2", signal.SIGINT),  # alpha's checkpoint of step 4: resumed at 2
        ("*/finetune/*.beta.ckpt*/state.json#2", signal.SIGKILL),  # alpha finished (reused), beta mid-task
        ("*/merges/task_arithmetic*", signal.SIGKILL),  # the first merge, its files written, before its rename
        ("*/merges/ties*", signal.SIGINT),  # the second merge (the first is reused)
        ("*/validation/results.json", signal.SIGKILL),
        ("*/validation/results.json", signal.SIGINT),
    ]
    for hold, sig in points:
        _interrupt(root, cfg, hold, sig)
    beta_log = json.loads((root / "reference" / "finetune" / "beta" / "log.json").read_text())
    assert beta_log["steps"] == 6  # the interrupted tasks had more steps to run than their checkpoints
    _rerun_equals_reference(root, cfg)


@pytest.mark.parametrize("stop_after", [4, 8], ids=["mid-epoch", "epoch-boundary"])
def test_a_task_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tiny_bert, tmp_path, monkeypatch,
                                                                        stop_after):
    """In process, fast: fine-tuning interrupted right after the checkpoint of step ``stop_after`` (8 batches
    an epoch: step 4 is mid-epoch, step 8 an epoch's end) and resumed gives the uninterrupted curve and
    weights bit for bit — dropout (on in the tiny BERT) draws the same masks after the resume."""
    from safetensors.torch import load_file

    import taskvec.finetune as ft
    from taskvec.finetune import FinetuneConfig, finetune_task

    cfg = FinetuneConfig(max_steps=12, eval_every=4, lr=3e-3, batch_size=8, test_size=20, val_size=10,
                         early_stopping=[], device="cpu")
    task = toy_task("t", n=90)
    ref = finetune_task(tiny_bert, task, tmp_path / "ref", cfg, progress=False)
    real = ft.save_checkpoint

    def interrupted(ckpt, model, best, opt, sched, rules, state):
        real(ckpt, model, best, opt, sched, rules, state)
        if state["step"] == stop_after:
            raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(ft, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune_task(tiny_bert, task, tmp_path / "r", cfg, progress=False)
    assert not (tmp_path / "r").exists()
    assert json.loads((tmp_path / ".r.ckpt" / "state.json").read_text())["step"] == stop_after
    monkeypatch.setattr(ft, "save_checkpoint", real)
    got = finetune_task(tiny_bert, task, tmp_path / "r", cfg, progress=False)
    assert got.curve == ref.curve and got.best_step == ref.best_step and got.steps == 12
    assert ref.best_step > 0  # the kept weights are trained ones, not the base
    a, b = load_file(tmp_path / "ref" / "model" / "model.safetensors"), load_file(tmp_path / "r" / "model" /
                                                                                  "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".r.ckpt").exists()


def test_what_an_interrupted_run_with_other_inputs_left_is_not_reused(tiny_bert, tmp_path, monkeypatch):
    """In process: a pipeline finishes with config A; rerun with config B (merge ``ta`` at another λ), it is
    interrupted after B's ``ta`` is written; rerun with A, the merge stage must be recomputed (its last
    attempt had other inputs), not take B's ``ta`` for A's."""
    import taskvec.merge as merge_pkg
    from taskvec.pipeline import run_pipeline

    cfg = yaml.safe_load(_config(tmp_path, tiny_bert).read_text())
    cfg["stages"] = ["finetune", "vectors", "merge"]
    cfg["merge"] = {"methods": [{"method": "task_arithmetic", "lambda": 0.5, "name": "ta"},
                                {"method": "ties", "density": 0.5, "name": "ties"}]}
    out = tmp_path / "run"
    run_pipeline(cfg, out)
    weights = out / "merges" / "ta" / "model.safetensors.index.json"
    first = {n: _content(f) for n, f in _visible(out / "merges" / "ta").items()}  # A's merge, as it was
    assert weights.is_file()
    other = {**cfg, "merge": {"methods": [{**cfg["merge"]["methods"][0], "lambda": 0.9}, cfg["merge"]["methods"][1]]}}
    real = merge_pkg.merge

    def merge_then_interrupt(config, dest, **kw):
        real(config, dest, **kw)
        raise KeyboardInterrupt("simulated Ctrl-C after the first merge")

    monkeypatch.setattr(merge_pkg, "merge", merge_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(other, out)
    changed = {n: _content(f) for n, f in _visible(out / "merges" / "ta").items()}
    assert any(changed[n] != first[n] for n in first if n.endswith(".safetensors"))  # B's ta is there
    monkeypatch.setattr(merge_pkg, "merge", real)
    run_pipeline(cfg, out)
    again = {n: _content(f) for n, f in _visible(out / "merges" / "ta").items()}
    assert again == first  # A's merge again, bit for bit (its model card: but for the date)
