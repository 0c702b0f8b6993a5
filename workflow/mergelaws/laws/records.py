"""Typed fit results and their JSON form.

Every fit returns a dataclass (``PerSizeFit``, ``UnifiedFit``, ``HoldoutCheck``,
``VarianceFit``, ...) built on :class:`Record` (a law's fit on :class:`LawFit`, which adds
``status``): read it by attribute; ``to_dict()`` gives the
dict that ``fits.json`` stores for it (one key per field, in field order; a field declared
with ``omit_none()`` is left out while it is None) and ``from_dict()`` reads it back.
``jsonable`` turns such a dict into strict JSON values (numpy scalars into Python ones,
non-finite floats into None).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

__all__ = ["NAN", "Record", "LawFit", "Interval", "jsonable", "omit_none"]

NAN = float("nan")


def omit_none(default: Any = None) -> Any:
    """A dataclass field left out of ``to_dict()`` while it is None."""
    return dataclasses.field(default=default, metadata={"omit_none": True})


def _plain(v: Any) -> Any:
    """Nested records as dicts (containers recursed); everything else as it is."""
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


@dataclasses.dataclass
class Record:
    """Base of the typed results: attribute access, ``update``, ``to_dict`` / ``from_dict``."""

    #: field name -> how to read its value from a dict (nested records)
    _readers: ClassVar[dict[str, Any]] = {}

    def update(self, **values: Any) -> None:
        """Set several fields at once (an unknown name is an error, not a new attribute)."""
        names = self.field_names()
        for name, value in values.items():
            if name not in names:
                raise AttributeError(f"{type(self).__name__} has no field {name!r}")
            setattr(self, name, value)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The result as the dict ``fits.json`` stores (nested records as dicts)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _plain(v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The record a ``to_dict()`` dict (e.g. read from ``fits.json``) describes; keys that
        are not fields are ignored, missing ones take the field's default."""
        names = cls.field_names()
        kw = {k: v for k, v in d.items() if k in names}
        for name, read in cls._readers.items():
            if kw.get(name) is not None:
                kw[name] = read(kw[name])
        return cls(**kw)


@dataclasses.dataclass
class LawFit(Record):
    """A fit of a law: its fields include ``converged`` and ``reason`` (None if it ran)."""

    @property
    def status(self) -> str:
        """``"ok"`` for a converged fit, else ``"failed: <reason>"``."""
        return "ok" if self.converged else f"failed: {self.reason or 'not converged'}"


@dataclasses.dataclass
class Interval(Record):
    """A percentile-bootstrap interval of one parameter: ``lo``, ``hi``, the replicates'
    ``sd`` and ``median``, and the fraction of replicates with the parameter at a bound."""

    lo: float | None = NAN
    hi: float | None = NAN
    sd: float | None = NAN
    median: float | None = NAN
    frac_at_bound: float | None = NAN


def jsonable(x):
    """Recursively turn numpy scalars into Python ones and non-finite floats into None."""
    if isinstance(x, Record):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x
