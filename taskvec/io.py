"""Atomic output helpers (write to a temporary sibling, then rename), the inter-process lock on an output,
and the type check of values read from configs."""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .errors import OutputExistsError, TaskvecError

log = logging.getLogger(__name__)


class LockError(TaskvecError):
    """An output (a run directory, a cache entry) is in use by another taskvec process."""


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output path unless ``overwrite``; return it as a Path."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p} exists; pass overwrite=True (--overwrite) to replace it")
    return p


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    Nothing is left behind on failure; an existing ``path`` is replaced only with ``overwrite``.
    """
    dest = check_output(path, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _test_hold(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary file path in the same folder; renamed onto ``path`` on success."""
    dest = check_output(path, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        _test_hold(dest)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(dest: Path) -> list[Path]:
    """Remove what a killed writer of ``dest`` left beside it: its temporary ``.<name>.tmp-<pid>-*`` and the
    superseded ``.<name>.old-<pid>`` of an interrupted replacement, when process ``pid`` is gone (a live
    writer's are left alone). Called by :func:`atomic_dir` and :func:`atomic_file` before they write, so a
    command killed with SIGKILL leaves nothing behind once the same output is written again. Returns what
    was removed."""
    import re

    removed = []
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return removed
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(?:tmp-(\d+)-.+|old-(\d+))")
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(1) or m.group(2))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                continue
        removed.append(p)
    if removed:
        log.info("removed %s, left by an interrupted taskvec process", ", ".join(map(str, removed)))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


#: test-only hook (see :func:`_test_hold`): how many matching atomic writes this process has reached
_hold_seen: dict[str, int] = {}


def _test_hold(dest: Path) -> None:
    """A test-only hook, off unless ``TASKVEC_TEST_HOLD`` is set (tests/test_interrupt.py uses it).

    ``TASKVEC_TEST_HOLD=GLOB`` or ``GLOB#N``: the N-th (default first) atomic write of this process whose
    destination path matches ``GLOB`` (:func:`fnmatch.fnmatch`) stops once its content is written and
    before it is renamed into place: it writes the destination into the file ``TASKVEC_TEST_HOLD_READY``
    and sleeps until it is signalled (at most 300 s, then exits with code 3). A test then interrupts the
    command at that exact point.
    """
    spec = os.environ.get("TASKVEC_TEST_HOLD")
    if not spec:
        return
    import fnmatch

    pattern, _, nth = spec.rpartition("#") if "#" in spec else (spec, "", "1")
    if not fnmatch.fnmatch(str(dest), pattern):
        return
    _hold_seen[spec] = _hold_seen.get(spec, 0) + 1
    if _hold_seen[spec] != int(nth):
        return
    ready = Path(os.environ["TASKVEC_TEST_HOLD_READY"])
    part = ready.with_name(ready.name + ".part")
    part.write_text(str(dest))
    os.replace(part, ready)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(3)


def sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite, in place, the header of the safetensors file ``path`` with its ``__metadata__`` keys sorted.

    safetensors writes the metadata in a random order (a hash map), so two writes of the same tensors and
    metadata differ in bytes; sorted, they are bit-identical (a rerun of an interrupted run can be checked
    against an uninterrupted one). The header keeps its length, so no tensor moves; a header that would
    not (it never happens with safetensors' compact JSON) is left as written."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n or raw.rstrip(b" ") != json.dumps(json.loads(raw), separators=(",", ":"),
                                                           ensure_ascii=False).encode():
            return  # not the compact form this expects: leave it
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj, overwrite: bool = True) -> None:
    """Write JSON atomically (indent 2, keys in insertion order)."""
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def replace_marked_section(path, name: str, text: str) -> bool:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in a file (atomically).

    Used by the benchmark and analysis scripts to publish measured numbers into the README. Returns
    whether the markers were found.
    """
    import re

    p = Path(path)
    s = p.read_text()
    new, n = re.subn(rf"(<!-- {re.escape(name)}:start -->\n).*?(<!-- {re.escape(name)}:end -->)",
                     lambda m: m.group(1) + text + m.group(2), s, flags=re.DOTALL)
    if n:
        with atomic_file(p) as tmp:
            tmp.write_text(new)
    return bool(n)


# --- the lock on an output -------------------------------------------------------------------------------

_held: dict[str, list] = {}  # lock file -> [owning thread id, depth]: this process's locks (re-entry)
_held_guard = threading.Lock()


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of the output ``path``: ``.<name>.lock`` beside it (so ``path`` need not exist yet)."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    return p.with_name(f".{p.name or 'root'}.lock")


def _holder(lockfile: Path) -> str:
    try:
        text = lockfile.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, blocking: bool = False):
    """Hold the inter-process lock on the output ``path`` (a run directory, a cache entry) for the block.

    The lock is ``fcntl.flock`` on :func:`lock_file` (``.<name>.lock`` beside ``path``), which records the
    holder (pid, start time, ``what`` it is doing). A second process is refused with a :class:`LockError`
    naming the holder (``blocking=False``), or waits for it (``blocking=True``). The lock is released
    when the block exits, also on exceptions, and by the kernel when the holding process dies (a stale
    file left by a killed process locks nothing); the lock file is removed on release, and so are the
    folders that were created for it and are still empty. Re-entrant in the thread that holds it (a
    pipeline that locks its run directory calls fine-tuning, which locks it again).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): unlocked, as before
        yield Path(path)
        return
    lockfile = lock_file(path)
    key = str(lockfile)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[0] == me:
            entry[1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield Path(path)
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    try:
        created = _acquire_dirs(lockfile.parent)
    except OSError as e:
        raise LockError(f"cannot create {lockfile.parent} for the lock file of {path} ({e.strerror})") from None
    try:
        fd = _acquire(fcntl, lockfile, path, blocking, created)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}".encode())
        with _held_guard:
            _held[key] = [me, 1]
        try:
            yield Path(path)
        finally:
            with _held_guard:
                _held.pop(key, None)
    finally:
        try:  # removed while still locked: a process that opened it before waits, then sees it is gone
            os.unlink(lockfile)
        except OSError:
            pass
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders created for a lock file, innermost first, while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


def _acquire_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` (and its missing parents) for a lock file; returns those created, innermost first."""
    missing = []
    d = folder
    while not d.exists():
        missing.append(d)
        d = d.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _acquire(fcntl, lockfile: Path, path, blocking: bool, created: list[Path]) -> int:
    """An open descriptor of ``lockfile`` holding its flock (the file at that path, not one since removed);
    folders made again on the way are added to ``created``."""
    while True:
        try:
            fd = os.open(lockfile, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # its folder was removed by a holder releasing: create it again
            created[:0] = _acquire_dirs(lockfile.parent)
            continue
        except OSError as e:
            raise LockError(f"cannot create the lock file {lockfile} for {path} ({e.strerror}); taskvec needs to "
                            f"write in {lockfile.parent}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(lockfile)
                if not blocking:
                    raise LockError(f"{path} is in use by another taskvec process ({holder}); wait for it or "
                                    f"remove {lockfile} if that process is gone") from None
                log.info("%s is in use by another taskvec process (%s); waiting for it", path, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(lockfile).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file while we waited: lock the one at the path now


def run_lock(path: str | os.PathLike, what: str):
    """:func:`exclusive_lock` on a run directory, non-blocking, taken by the main process of a launch only.

    Under ``torchrun`` / ``accelerate launch`` (``RANK`` set) every rank of one job writes into the same
    run, so only rank 0 takes the lock; the other ranks of a second job are stopped by the launcher when
    its rank 0 is refused.
    """
    if os.environ.get("RANK", "0") not in ("", "0"):
        return nullcontext(Path(path))
    return exclusive_lock(path, what)


# --- types of values read from configs -------------------------------------------------------------------


def check_value(where: str, value, tp):
    """``value`` checked against the annotation ``tp`` (``int``, ``float``, ``bool``, ``str``, ``dict``,
    ``list[X]``, ``X | None``, or anything else: not checked); returns it, with a float given as a
    numeric string (YAML reads ``1e-3`` as one) converted. Raises :class:`TaskvecError` naming ``where``,
    the expected type and the value given."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return check_value(where, value, rest[0])
        for a in rest:
            try:
                return check_value(where, value, a)
            except TaskvecError:
                pass
        raise TaskvecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise TaskvecError(f"{where}: expected a finite number, got {value!r}")
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is dict or origin is dict:
        ok = isinstance(value, dict)
    elif tp is list or origin is list:
        if not isinstance(value, list):
            raise TaskvecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [check_value(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    else:
        return value
    if not ok:
        raise TaskvecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp) -> str:
    import typing

    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", type(None): "none"}
    if tp in names:
        return names[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))
