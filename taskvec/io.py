"""Atomic output helpers: write to a temporary sibling, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
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
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
