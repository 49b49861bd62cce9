"""Two processes on one run directory or cache entry (docs/reliability.md): the second is refused with a
one-line message naming the first (runs), or waits for it and reuses its result (the SmolLM2 conversion).

Every wait is explicit: the first process writes a file once it holds the lock and goes on only when the
test writes another one; a blocked process is seen by the log line it writes before it blocks. The timeouts
are only there to fail a hung test, never to order events.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import toy_task

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.io import LockError, exclusive_lock, lock_file

GUARD_S = 300  # fails a hung test; never reached when things work


def _python(code: str, *args, stderr=subprocess.PIPE, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=stderr)


def _wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process exited ({proc.returncode}) before {what}: {out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {GUARD_S} s")
        time.sleep(0.05)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


HOLDER = """
    import sys, time, pathlib
    import taskvec.finetune as ft

    ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    real = ft.finetune_task

    def paused(*args, **kwargs):  # OUT is locked and run.json written: say so, wait to be told to go on
        ready.write_text(str(__import__("os").getpid()))
        deadline = time.monotonic() + 300
        while not go.exists():
            if time.monotonic() > deadline:
                sys.exit("never told to go on")
            time.sleep(0.05)
        return real(*args, **kwargs)

    ft.finetune_task = paused
    from taskvec.cli import main
    sys.exit(main(sys.argv[3:]))
"""


def test_a_second_process_is_refused_while_the_first_holds_the_run(tiny_bert, tmp_path, capsys):
    t = toy_task("toy", n=60)
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
    out = tmp_path / "run"
    args = ["finetune", "--model", tiny_bert, "--tasks", data, "--out", out, "--device", "cpu", "--max-steps", "2",
            "--eval-every", "1", "--test-size", "10", "--val-size", "6"]
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = _python(HOLDER, ready, go, *args)
    try:
        _wait_for(ready.exists, first, "signal that it holds the lock")
        held = _files(out)
        assert "run.json" in held and lock_file(out).is_file()
        # a second process: refused at once, exit code 2, one line naming the holder and the lock file
        second = _python("import sys\nfrom taskvec.cli import main\nsys.exit(main(sys.argv[1:]))", *args)
        _, err = second.communicate(timeout=GUARD_S)
        assert second.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert re.fullmatch(rf"taskvec finetune: error: {re.escape(str(out))} is in use by another taskvec process "
                            rf"\(pid {first.pid}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d: taskvec finetune\); "
                            rf"wait for it or remove {re.escape(str(lock_file(out)))} if that process is gone",
                            lines[0]), lines[0]
        # `taskvec run` into the same directory (here, from this process) is refused the same way
        cfg = tmp_path / "pipeline.yaml"
        cfg.write_text(f"model: {tiny_bert}\ntasks: [{data}]\nstages: [finetune]\nfinetune: {{max_steps: 2, "
                       "eval_every: 1, test_size: 10, val_size: 6, device: cpu}\n")
        capsys.readouterr()
        assert main(["run", str(cfg), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out} is in use by another taskvec process (pid {first.pid}" in err[0], err
        assert _files(out) == held  # the refused commands changed nothing
    finally:
        go.write_text("go")
        rc = first.wait(timeout=GUARD_S)
    assert rc == 0, first.communicate()
    from taskvec.runs import Run

    run = Run.open(out)  # the first process's result is whole
    assert run.names == ["toy"] and run.task("toy").log["steps"] == 2
    assert (out / "finetune" / "toy" / "model" / "model.safetensors").is_file()
    assert not lock_file(out).exists()  # released (and removed) when the first process finished
    with exclusive_lock(out, "test"):
        pass


def test_the_lock_is_released_after_an_exception(tmp_path):
    out = tmp_path / "a" / "b" / "run"  # the lock file's folders are made, then removed again
    with pytest.raises(RuntimeError, match="boom"), exclusive_lock(out, "test"):
        assert lock_file(out).is_file() and "test" in lock_file(out).read_text()
        raise RuntimeError("boom")
    assert not lock_file(out).exists() and not (tmp_path / "a").exists()
    done = []
    worker = threading.Thread(target=lambda: done.append(_take(out)))  # another holder (a thread's own flock)
    worker.start()
    worker.join(GUARD_S)
    assert done == ["taken"]


def _take(path) -> str:
    with exclusive_lock(path, "thread"):
        return "taken"


def test_the_lock_is_released_when_a_stage_fails(tiny_bert, tmp_path, monkeypatch):
    from taskvec import pipeline

    def fail(*a, **k):
        raise TaskvecError("stage failed")

    t = toy_task("toy", n=60)
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n' for x, y in zip(t.texts, t.labels)))
    monkeypatch.setattr(pipeline, "_run_stage", fail)
    cfg = {"model": str(tiny_bert), "tasks": [str(data)], "stages": ["finetune"],
           "finetune": {"max_steps": 2, "test_size": 10, "val_size": 6, "device": "cpu"}}
    with pytest.raises(TaskvecError, match="stage failed"):
        pipeline.run_pipeline(cfg, tmp_path / "run")
    assert not lock_file(tmp_path / "run").exists()
    done = []
    worker = threading.Thread(target=lambda: done.append(_take(tmp_path / "run")))
    worker.start()
    worker.join(GUARD_S)
    assert done == ["taken"]


def test_the_lock_is_reentrant_in_its_thread_and_refuses_another(tmp_path):
    out = tmp_path / "run"
    refused = []

    def other():
        try:
            with exclusive_lock(out, "other thread"):
                refused.append(False)
        except LockError as e:
            refused.append(str(e))

    with exclusive_lock(out, "outer"):
        with exclusive_lock(out, "inner"):  # a pipeline locks OUT, then fine-tuning locks it again
            t = threading.Thread(target=other)
            t.start()
            t.join(GUARD_S)
        assert lock_file(out).is_file()  # still held by the outer block
    assert len(refused) == 1 and f"{out} is in use by another taskvec process (pid {os.getpid()}" in refused[0]
    assert "outer" in refused[0] and not lock_file(out).exists()


CONVERTER = """
    import logging, sys, time, pathlib
    import taskvec.modeling as m

    role, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    def convert(out):
        if role == "second":
            sys.exit("the second process converted again")
        ready.write_text("converting")
        deadline = time.monotonic() + 300
        while not go.exists():
            if time.monotonic() > deadline:
                sys.exit("never told to go on")
            time.sleep(0.05)
        with m.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"converted by the first process")

    m._convert_smollm2 = convert
    print(m._smollm2_dir())
"""


def test_a_second_smollm2_conversion_waits_and_reuses_the_first(tmp_path):
    env = {"TASKVEC_CACHE": str(tmp_path / "cache")}
    ready, go, log = tmp_path / "ready", tmp_path / "go", tmp_path / "second.log"
    first = _python(CONVERTER, "first", ready, go, env=env)
    second = None
    try:
        _wait_for(ready.exists, first, "signal that it is converting")
        with open(log, "w") as f:  # the second process logs that it waits before it blocks
            second = _python(CONVERTER, "second", ready, go, stderr=f, env=env)
            _wait_for(lambda: "waiting for it" in log.read_text(), second, "log line saying it waits")
    finally:
        go.write_text("go")
    assert first.wait(timeout=GUARD_S) == 0, first.communicate()
    out2, _ = second.communicate(timeout=GUARD_S)
    assert second.returncode == 0, log.read_text()
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert first.stdout.read().strip() == out2.strip() == str(target)
    assert (target / "model.safetensors").read_bytes() == b"converted by the first process"
    assert "converting SmolLM2 into the taskvec cache" in log.read_text()  # it named what it waited for
    assert not lock_file(target).exists()


# --- every writing command takes the lock (vectors, ntk, validate, report on a run; merge on its output) --


def _hold(args, ready: Path, hold: str) -> subprocess.Popen:
    """``taskvec ARGS`` in a process that stops at its first atomic write matching ``hold``, holding its lock
    (the test-only hook of taskvec.io); ``ready`` appears when it is there."""
    code = "import sys\nfrom taskvec.cli import main\nsys.exit(main(sys.argv[1:]))"
    return _python(code, *args, env={"TASKVEC_TEST_HOLD": hold, "TASKVEC_TEST_HOLD_READY": str(ready)})


def _refused_line(err: str, command: str, path: Path, holder: subprocess.Popen, what: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"taskvec {command}: error: {path} is in use by another taskvec process "
                               f"(pid {holder.pid}, since "), lines[0]
    assert f": taskvec {what}); wait for it or remove {lock_file(path)} if that process is gone" in lines[0]


def test_commands_writing_into_a_run_are_refused_while_another_process_writes_it(tiny_run, tmp_path, capsys):
    """A process re-extracting task vectors holds the run; a second `taskvec vectors` (another process), and
    `ntk`, `validate` and `report` on the same run, are refused with the one-line message and change
    nothing; the first, interrupted, leaves the run as it was and the lock free."""
    import shutil
    import signal

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = _files(run)
    ready = tmp_path / "ready"
    first = _hold(["vectors", run, "--overwrite"], ready, "*/vectors/a.safetensors")
    try:
        _wait_for(ready.exists, first, "signal that it holds the run")
        held = _files(run)  # (with the first process's temporary vector file)
        second = _python("import sys\nfrom taskvec.cli import main\nsys.exit(main(sys.argv[1:]))", "vectors", run,
                         "--overwrite")
        _, err = second.communicate(timeout=GUARD_S)
        assert second.returncode == 2, err
        _refused_line(err, "vectors", run, first, "vectors")
        for argv in (["ntk", run, "--n", "4", "--overwrite"], ["validate", run, "--n-eval", "8", "--overwrite"],
                     ["report", run, "--overwrite"]):
            capsys.readouterr()
            assert main([str(a) for a in argv]) == 2, argv
            _refused_line(capsys.readouterr().err, argv[0], run, first, "vectors")
        assert _files(run) == held  # the refused commands wrote nothing
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=GUARD_S)
    assert first.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("taskvec vectors: interrupted"), err
    assert _files(run) == before  # the interrupted rewrite left every vector as it was, no temporary file
    assert not lock_file(run).exists()
    assert main(["report", str(run), "--overwrite"]) == 0  # the run is free again


def test_a_second_merge_into_one_output_is_refused(tiny_run, tmp_path, capsys):
    """Two `taskvec merge` processes writing one output: the second is refused while the first holds it."""
    import signal

    import yaml

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"method": "task_arithmetic", "run": str(tiny_run), "parameters": {"lambda": 0.5}}))
    out, ready = tmp_path / "merged", tmp_path / "ready"
    first = _hold(["merge", cfg, out, "--no-progress"], ready, str(out))
    try:
        _wait_for(ready.exists, first, "signal that it is about to rename its merge into place")
        second = _python("import sys\nfrom taskvec.cli import main\nsys.exit(main(sys.argv[1:]))", "merge", cfg, out,
                         "--no-progress")
        _, err = second.communicate(timeout=GUARD_S)
        assert second.returncode == 2, err
        _refused_line(err, "merge", out, first, "merge")
        assert not out.exists()
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=GUARD_S)
    assert first.returncode == 130, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "ready"]
    capsys.readouterr()
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert (out / "model.safetensors.index.json").is_file() and not lock_file(out).exists()
