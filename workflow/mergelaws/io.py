"""Atomic file output: write to a temp name in the same directory, then rename."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On error the temporary file or directory is removed, so nothing half-written
    ever sits under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    for stale in path.parent.glob(f"{prefix}*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp make them private
    try:
        yield tmp
        _fault_point(path)
        if is_dir:
            if path.exists():
                shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


FAULT_ENV = "MERGELAWS_FAULT_KILL_BEFORE_RENAME"


def _fault_point(path: Path) -> None:
    """Fault injection for the tests: with MERGELAWS_FAULT_KILL_BEFORE_RENAME set to a glob
    matching ``path``'s name, the process SIGKILLs itself after the temp output is fully
    written and before it is renamed -- the worst moment for a job to die."""
    pattern = os.environ.get(FAULT_ENV)
    if pattern and fnmatch.fnmatch(path.name, pattern):
        os.kill(os.getpid(), signal.SIGKILL)
