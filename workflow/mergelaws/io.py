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


# ---- reading tables the commands take as input -------------------------------------------------

#: The columns every losses table has (``mergelaws fit``/``plan``/``figures`` read them).
LOSSES_COLUMNS = ("size", "params", "method", "k", "subset", "eval_domain", "loss")


def _check_input_file(path: Path, what: str, fix: str) -> None:
    from mergelaws.errors import TableError

    if not path.exists():
        raise TableError(f"{what} {path} does not exist; {fix}")
    if not path.is_file():
        raise TableError(f"{what} {path} is not a file (a directory?); {fix}")
    if path.stat().st_size == 0:
        raise TableError(f"{what} {path} is empty; {fix}")


def read_table(path: str | os.PathLike, what: str = "losses table", columns=LOSSES_COLUMNS,
               fix: str = "pass the losses.parquet (or .csv) the workflow's aggregate step writes"):
    """A parquet or CSV table with the given columns, or one TableError line naming the file."""
    import pandas as pd

    from mergelaws.errors import TableError, one_line

    path = Path(path)
    _check_input_file(path, what, fix)
    try:
        table = pd.read_parquet(path) if path.suffix != ".csv" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow and pandas raise many kinds; all mean unreadable
        kind = "CSV" if path.suffix == ".csv" else "parquet"
        raise TableError(f"{what} {path} is not a readable {kind} file ({one_line(exc, 160)}); {fix}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise TableError(f"{what} {path} lacks the column(s) {', '.join(missing)} (it has: "
                         f"{', '.join(map(str, table.columns[:12]))}); {fix}")
    if table.empty:
        raise TableError(f"{what} {path} has no rows; {fix}")
    return table


def read_json(path: str | os.PathLike, what: str = "fits file", keys=("per_size",),
              fix: str = "pass the fits.json that `mergelaws fit` writes"):
    """A JSON object with the given top-level keys, or one TableError line naming the file."""
    import json

    from mergelaws.errors import TableError

    path = Path(path)
    _check_input_file(path, what, fix)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TableError(f"{what} {path} is not valid JSON ({type(exc).__name__}); {fix}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise TableError(f"{what} {path} lacks the key(s) {', '.join(missing)}; {fix}")
    return obj
