"""The fits of a losses table, typed: ``Fits`` (what ``runner.fit_all`` returns and
``fits.json`` stores), ``load_fits`` to read a fits file back, and the tables written next
to it (``summary_frame``, ``unified_frame``, ``variance_frame``).

``Fits.to_dict()`` is exactly the JSON object of ``fits.json``: ``{"per_size": [...],
"unified": [...], "variance": [...], "settings": {...}}`` with every non-finite number as
None; ``Fits.from_dict`` / ``load_fits`` read it into ``PerSizeFit``, ``UnifiedFit`` and
``VarianceFit`` records.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mergelaws.laws.per_size import PerSizeFit
from mergelaws.laws.records import jsonable
from mergelaws.laws.unified import UNIFIED_PARAMS, HoldoutCheck, UnifiedFit
from mergelaws.laws.variance import VarianceFit

__all__ = ["Fits", "load_fits", "as_fits", "fits_json", "summary_frame", "unified_frame",
           "variance_frame"]


@dataclasses.dataclass
class Fits:
    """Every fit of a losses table: per (method, view) the per-size law for each size
    (``per_size``), the unified law (``unified``) and the variance laws for each size
    (``variance``), and the ``settings`` they were fitted with."""

    per_size: list[PerSizeFit] = dataclasses.field(default_factory=list)
    unified: list[UnifiedFit] = dataclasses.field(default_factory=list)
    variance: list[VarianceFit] = dataclasses.field(default_factory=list)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``fits.json`` (strict JSON values: non-finite numbers as None)."""
        return jsonable({"per_size": [f.to_dict() for f in self.per_size],
                         "unified": [f.to_dict() for f in self.unified],
                         "variance": [f.to_dict() for f in self.variance],
                         "settings": self.settings})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fits:
        """The fits a ``fits.json`` object describes (a missing list is empty)."""
        return cls(per_size=[PerSizeFit.from_dict(f) for f in d.get("per_size") or []],
                   unified=[UnifiedFit.from_dict(f) for f in d.get("unified") or []],
                   variance=[VarianceFit.from_dict(f) for f in d.get("variance") or []],
                   settings=dict(d.get("settings") or {}))

    def per_size_of(self, view: str) -> list[PerSizeFit]:
        """The per-size fits of ``view``."""
        return [f for f in self.per_size if f.view == view]

    def unified_of(self, view: str) -> list[UnifiedFit]:
        """The unified fits of ``view``."""
        return [f for f in self.unified if f.view == view]

    def variance_of(self, view: str) -> list[VarianceFit]:
        """The variance-law fits of ``view``."""
        return [f for f in self.variance if f.view == view]


def fits_json(fits: Fits) -> str:
    """The text of ``fits.json`` for ``fits``."""
    return json.dumps(fits.to_dict(), indent=2, sort_keys=True, default=float) + "\n"


def load_fits(path: str | os.PathLike) -> Fits:
    """Read a ``fits.json`` (as the fit command writes it) into typed ``Fits``."""
    return Fits.from_dict(json.loads(Path(path).read_text()))


def as_fits(fits: Fits | Mapping | None) -> Fits | None:
    """``fits`` as ``Fits``: None and ``Fits`` as they are, a ``fits.json`` object (a
    mapping, e.g. from ``json.load``) read with ``Fits.from_dict``."""
    if fits is None or isinstance(fits, Fits):
        return fits
    if isinstance(fits, Mapping):
        return Fits.from_dict(fits)
    raise TypeError(f"expected Fits, a fits.json mapping or None, got {type(fits).__name__}")


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

_SUMMARY_COLUMNS = ["size", "params", "method", "view", "L_inf", "A", "b", "L_star", "B", "beta",
                    "A0", "gamma", "r2", "r2_weighted", "rmse", "n_points", "converged",
                    "at_bound", "weights", "loss", "reason"]


def summary_frame(fits: Fits) -> pd.DataFrame:
    """One row per per-size fit, plus one row per unified fit with ``size="all"``."""
    rows = []
    for f in fits.per_size:
        rows.append({c: getattr(f, c, None) for c in _SUMMARY_COLUMNS})
    for f in fits.unified:
        r = {c: getattr(f, c, None) for c in _SUMMARY_COLUMNS}
        r["size"] = "all"
        r["params"] = None
        rows.append(r)
    df = pd.DataFrame(rows, columns=_SUMMARY_COLUMNS)
    df["at_bound"] = [",".join(v) if isinstance(v, list) else (v or "") for v in df["at_bound"]]
    for c in ["L_inf", "A", "b", "L_star", "B", "beta", "A0", "gamma", "r2", "r2_weighted", "rmse"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["params"] = pd.to_numeric(df["params"], errors="coerce").astype("Int64")
    df["n_points"] = pd.to_numeric(df["n_points"], errors="coerce").astype("Int64")
    df["converged"] = df["converged"].astype(bool)
    return df


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def unified_frame(fits: Fits) -> pd.DataFrame:
    """The unified-law table: one row per (method, view) with every parameter, its interval
    (``<p>_lo``, ``<p>_hi``; NaN without bootstrap) and the fraction of bootstrap refits
    with it at a bound (``<p>_frac_at_bound``), then R², RMSE, convergence, the parameters
    at a bound, the weights and loss, the bootstrap size and converged fraction, and the
    held-out-size check (``holdout_*``; ``holdout_status`` says why it was skipped)."""
    rows = []
    for f in fits.unified:
        ci = f.ci or {}
        r: dict[str, Any] = {"method": f.method, "view": f.view,
                             "sizes": ",".join(f.sizes or []), "n_sizes": f.n_sizes,
                             "n_points": f.n_points}
        for p in UNIFIED_PARAMS:
            c = ci.get(p)
            r[p] = _num(getattr(f, p))
            r[f"{p}_lo"] = _num(c.lo if c else None)
            r[f"{p}_hi"] = _num(c.hi if c else None)
            r[f"{p}_frac_at_bound"] = _num(c.frac_at_bound if c else None)
        ho = f.holdout or HoldoutCheck()
        r.update({
            "r2": _num(f.r2), "r2_weighted": _num(f.r2_weighted),
            "rmse": _num(f.rmse), "converged": bool(f.converged),
            "at_bound": ",".join(f.at_bound or []), "weights": f.weights,
            "loss": f.loss, "f_scale": _num(f.f_scale),
            "n_boot": int(f.n_boot or 0),
            "boot_frac_converged": _num(f.boot_frac_converged),
            "level": _num(f.level),
            "holdout_status": ho.status, "holdout_size": ho.size,
            "holdout_mae": _num(ho.mae), "holdout_rmse": _num(ho.rmse),
            "holdout_max_rel_err": _num(ho.max_rel_err),
            "holdout_insample_rmse": _num(ho.insample_rmse),
            "reason": f.reason,
        })
        rows.append(r)
    cols = (["method", "view", "sizes", "n_sizes", "n_points"]
            + [c for p in UNIFIED_PARAMS for c in (p, f"{p}_lo", f"{p}_hi", f"{p}_frac_at_bound")]
            + ["r2", "r2_weighted", "rmse", "converged", "at_bound", "weights", "loss", "f_scale",
               "n_boot", "boot_frac_converged", "level", "holdout_status", "holdout_size",
               "holdout_mae", "holdout_rmse", "holdout_max_rel_err", "holdout_insample_rmse",
               "reason"])
    return pd.DataFrame(rows, columns=cols)


_VARIANCE_COLUMNS = ["size", "params", "method", "view", "M", "n_points", "C_inv_k", "r2_inv_k",
                     "rmse_inv_k", "C_finite_pool", "r2_finite_pool", "rmse_finite_pool",
                     "loglog_slope", "better", "converged", "reason"]


def variance_frame(fits: Fits) -> pd.DataFrame:
    """The variance-law table: one row per (size, method, view) of ``fits.variance``."""
    df = pd.DataFrame([{c: getattr(f, c) for c in _VARIANCE_COLUMNS} for f in fits.variance],
                      columns=_VARIANCE_COLUMNS)
    for c in ["C_inv_k", "r2_inv_k", "rmse_inv_k", "C_finite_pool", "r2_finite_pool",
              "rmse_finite_pool", "loglog_slope"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ["params", "M", "n_points"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df["converged"] = df["converged"].astype(bool)
    return df
