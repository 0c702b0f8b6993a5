"""Every fit of a losses table at once, and the fit step's output files.

* ``fit_all``: per (method, view), the per-size law for every size, the unified law (with
  the held-out-size check and bootstrap intervals) and the variance laws for every size;
  returns typed ``Fits``.
* ``FitSettings``: the fit step's settings (weights, loss, f_scale, n_boot, seed,
  interval), from the config's ``fit`` section with command-line overrides, checked.
* ``write_fits``: ``fits.json``, ``summary.csv``, ``unified.{parquet,csv}`` and
  ``variance.{parquet,csv}``, each written atomically.
* ``run_fit``: all of it for a losses table (what the fit command does); ``FitRun.report``
  is the text the command prints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mergelaws import io
from mergelaws.laws.bootstrap import summarise_unified, unified_draws
from mergelaws.laws.holdout import MIN_SIZES_HOLDOUT, holdout_largest_size
from mergelaws.laws.intervals import (
    DEFAULT_INTERVAL,
    INTERVALS,
    PRIOR_DOF,
    check_interval,
)
from mergelaws.laws.per_size import DEFAULT_B_BOUNDS, PerSizeFit, fit_per_size
from mergelaws.laws.results import (
    Fits,
    fits_json,
    summary_frame,
    unified_frame,
    variance_frame,
)
from mergelaws.laws.solvers import check_loss
from mergelaws.laws.unified import (
    DEFAULT_UNIFIED_BOUNDS,
    UNIFIED_PARAMS,
    UnifiedFit,
    fit_unified,
)
from mergelaws.laws.variance import VARIANCE_LAWS, VarianceFit, fit_variance
from mergelaws.laws.views import (
    aggregate_views,
    fit_views,
    normalise_losses,
    pools_of,
    subset_values,
)

__all__ = ["fit_all", "FitSettings", "FitSettingsError", "FitRun", "write_fits", "run_fit"]


def fit_all(
    losses: pd.DataFrame,
    views: Sequence[str] | str = ("in_domain", "cross_domain"),
    weights: str = "k",
    b_bounds: tuple[float, float] = DEFAULT_B_BOUNDS,
    unified_bounds: dict[str, tuple[float, float]] | None = None,
    loss: str = "linear",
    f_scale: float | None = None,
    n_boot: int = 0,
    seed: int = 0,
    level: float = 0.95,
    interval: str = DEFAULT_INTERVAL,
) -> Fits:
    """Fit, per (method, view), the per-size law for every size, the unified law (with
    bootstrap intervals when ``n_boot`` > 0, and the held-out-size check), and the variance
    laws for every size, on the per-k statistics of ``view_table(losses, views)``.

    ``views``: a list of views, one view name, or ``"all"`` for ``fit_views(losses)``
    (in-domain, cross-domain and every ``domain:<d>``).  ``weights``: ``"k"`` (the paper's),
    ``"sem"`` or ``"none"``; ``loss``: ``"linear"`` or ``"huber"`` with threshold
    ``f_scale`` (None: automatic), for every fit of a law of the mean loss (the variance
    laws are plain least squares, as the paper's).  ``n_boot`` bootstrap replicates
    (``bootstrap.unified_draws``; seeded by ``seed``) of the kind ``interval`` names:
    ``"parametric"`` (cell means drawn from the fit plus each cell's sampling noise under the
    variance law, the default) or ``"subsets"`` (merged subsets resampled within each
    (size, k) cell); intervals are percentile intervals at ``level``.

    Returns ``Fits`` (``Fits.to_dict()`` is the JSON of ``fits.json``; non-finite numbers
    are None).  Each ``UnifiedFit`` carries ``holdout`` (``holdout_largest_size``) and ``ci``
    ({parameter: ``Interval``}, None without bootstrap).  Deterministic: same input, same
    output.
    """
    if weights not in ("k", "sem", "none"):
        raise ValueError("weights must be 'k', 'sem' or 'none'")
    check_loss(loss, f_scale)
    if int(n_boot) < 0:
        raise ValueError("n_boot must be >= 0")
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    check_interval(interval)
    df = normalise_losses(losses)
    if isinstance(views, str):
        views = fit_views(df) if views == "all" else [views]
    views = list(views)
    table = aggregate_views(df, views)
    pools = pools_of(df)
    ub = dict(DEFAULT_UNIFIED_BOUNDS)
    if unified_bounds:
        ub.update(unified_bounds)
    per_size: list[PerSizeFit] = []
    unified: list[UnifiedFit] = []
    variance: list[VarianceFit] = []
    per_subset: dict[str, pd.DataFrame] = {}
    if not table.empty:
        for (method, view), g in table.groupby(["method", "view"], sort=True):
            for (params, size), h in g.groupby(["params", "size"], sort=True):
                h = h.sort_values("k")
                f = fit_per_size(h["k"].to_numpy(), h["mean"].to_numpy(), weights=weights,
                                 b_bounds=b_bounds, sem=h["sem"].to_numpy(), loss=loss,
                                 f_scale=f_scale)
                f.update(size=size, params=int(params), N=params / 1e9, method=method, view=view,
                         k_fitted=sorted(int(v) for v in h.loc[h["k"] >= 1, "k"]))
                per_size.append(f)
                fv = fit_variance(h["k"].to_numpy(), h["var"].to_numpy(),
                                  M=pools.get((str(size), str(method))),
                                  n_subsets=h["n_subsets"].to_numpy())
                fv.update(size=size, params=int(params), N=params / 1e9, method=method, view=view)
                variance.append(fv)
            g = g.sort_values(["params", "k"])
            sizes = g[["params", "size"]].drop_duplicates().sort_values("params")
            f = fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(), g["mean"].to_numpy(),
                            weights=weights, bounds=ub, sem=g["sem"].to_numpy(), loss=loss,
                            f_scale=f_scale)
            holdout = holdout_largest_size(g, weights=weights, bounds=ub, loss=loss,
                                           f_scale=f_scale, full_fit=f)
            f.update(method=method, view=view, sizes=[str(s) for s in sizes["size"]],
                     params=[int(p) for p in sizes["params"]], holdout=holdout)
            if n_boot and f.converged:
                if view not in per_subset:
                    per_subset[view] = subset_values(df, view)
                vals = per_subset[view]
                draws = unified_draws(vals[vals["method"] == method], f, n_boot=n_boot,
                                      seed=seed, weights=weights, loss=loss, f_scale=f_scale,
                                      bounds=ub, key=(str(method), str(view)),
                                      interval=interval)
                f.update(**summarise_unified(f, draws, level))
            unified.append(f)
    settings = {
        "law_per_size": "L(k) = L_inf + A/(k+b)",
        "law_unified": "L(N,k) = L_star + B*N^-beta + A0*N^-gamma/(k+b), N = params/1e9",
        "law_variance": dict(VARIANCE_LAWS),
        "views": list(views),
        "weights": weights,
        "weights_meaning": "weights on squared residuals; 'k': w = k, 'sem': w = 1/sem^2, 'none': w = 1",
        "loss": loss,
        "f_scale": None if f_scale is None else float(f_scale),
        "loss_meaning": ("linear: least squares; huber: Huber loss on the weighted residuals "
                         "sqrt(w/mean w)*(y - fit), threshold f_scale in loss units (None: 1.345 x "
                         "the MAD-based sd of the residuals, re-estimated each IRLS iteration)"),
        "k_min_fitted": 1,
        "b_bounds": [float(b_bounds[0]), float(b_bounds[1])],
        "unified_bounds": {n: [float(v[0]), float(v[1])] for n, v in sorted(ub.items())},
        "fitted_on": "per-k means across subsets (view_table)",
        "r2": "unweighted, on the fitted points (r2_weighted also reported)",
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
                      "interval": interval,
                      "resampling": _RESAMPLING[interval]},
        "variance_fit": "unweighted least squares on the across-subset variance at each k "
                        "with >= 2 subsets; M = the expert pool (distinct members)",
        "holdout": f"unified law fitted on all sizes but the largest, largest predicted "
                   f"(needs >= {MIN_SIZES_HOLDOUT} sizes)",
    }
    # through the JSON form: the same values (None for non-finite) as fits.json read back
    return Fits.from_dict(Fits(per_size, unified, variance, settings).to_dict())


# --------------------------------------------------------------------------------------
# The fit step
# --------------------------------------------------------------------------------------


_RESAMPLING = {
    "parametric": ("each (size, k) cell mean drawn from the fitted law + normal noise of sd "
                   "sqrt(s2/n), s2 = the size's variance law C/k shrunk towards the cell's own "
                   f"across-subset variance ({PRIOR_DOF:g} pseudo degrees of freedom; one subset: "
                   "C/k); percentile intervals; each replicate refitted from the point estimate"),
    "subsets": ("merged subsets with replacement within each (size, k) cell; percentile "
                "intervals; each replicate refitted from the point estimate"),
}


class FitSettingsError(ValueError):
    """A fit setting out of range, named with the config key and command-line flag to fix."""


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """The fit step's settings (config ``fit`` section; the fit command's flags)."""

    weights: str = "k"
    loss: str = "linear"
    f_scale: float | None = None
    n_boot: int = 200
    seed: int = 0
    interval: str = DEFAULT_INTERVAL

    @classmethod
    def resolve(cls, fit_config: Mapping | None = None, *, weights: str | None = None,
                loss: str | None = None, f_scale: float | None = None, n_boot: int | None = None,
                seed: int | None = None, interval: str | None = None) -> FitSettings:
        """The settings from ``fit_config`` (the config's ``fit`` section; None: defaults),
        each overridden by the keyword given (None: not given), checked: raises
        ``FitSettingsError`` for a bad loss / f_scale or a negative n_boot."""
        fcfg = fit_config or {}
        out = cls(weights=weights or fcfg.get("weights", "k"),
                  loss=loss or fcfg.get("loss", "linear"),
                  f_scale=f_scale if f_scale is not None else fcfg.get("f_scale"),
                  n_boot=n_boot if n_boot is not None else fcfg.get("n_boot", 200),
                  seed=seed if seed is not None else fcfg.get("seed", 0),
                  interval=interval or fcfg.get("interval", DEFAULT_INTERVAL))
        try:
            check_loss(out.loss, out.f_scale)
        except ValueError as exc:
            raise FitSettingsError(f"fit: {exc} (set fit.loss / fit.f_scale or --loss / --f-scale)") from exc
        if out.interval not in INTERVALS:
            raise FitSettingsError(f"fit: interval = {out.interval!r} must be one of "
                                   f"{list(INTERVALS)} (set fit.interval)")
        if out.n_boot < 0:
            raise FitSettingsError(f"fit: n_boot = {out.n_boot} must be >= 0 (set fit.n_boot or --n-boot)")
        return out


def write_fits(fits: Fits, out_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Write ``fits.json``, ``summary.csv``, ``unified.{parquet,csv}`` and
    ``variance.{parquet,csv}`` into ``out_dir``, each atomically.  Returns the tables
    (``summary``, ``unified``, ``variance``)."""
    out = Path(out_dir)
    io.write_text(out / "fits.json", fits_json(fits))
    tables = {"summary": summary_frame(fits), "unified": unified_frame(fits),
              "variance": variance_frame(fits)}
    with io.atomic_path(out / "summary.csv") as tmp:
        tables["summary"].to_csv(tmp, index=False)
    for name in ("unified", "variance"):
        with io.atomic_path(out / f"{name}.parquet") as tmp:
            tables[name].to_parquet(tmp, index=False)
        with io.atomic_path(out / f"{name}.csv") as tmp:
            tables[name].to_csv(tmp, index=False)
    return tables


@dataclasses.dataclass
class FitRun:
    """What ``run_fit`` fitted and wrote."""

    fits: Fits
    settings: FitSettings
    out_dir: Path
    #: summary, unified and variance, as written
    tables: dict[str, pd.DataFrame]

    def report(self) -> str:
        """The text the fit command prints: the in-domain and cross-domain fits, the unified
        law with its intervals, the variance laws and where the files went."""
        summary, uni, var = self.tables["summary"], self.tables["unified"], self.tables["variance"]
        main = ["in_domain", "cross_domain"]
        uni = uni[uni["view"].isin(main)]

        def cell(r, p):
            lo, hi = r[f"{p}_lo"], r[f"{p}_hi"]
            return f"{r[p]:.4g}" if pd.isna(lo) else f"{r[p]:.4g} [{lo:.3g}, {hi:.3g}]"

        brief = pd.DataFrame({"method": uni["method"], "view": uni["view"],
                              **{p: [cell(r, p) for _, r in uni.iterrows()] for p in UNIFIED_PARAMS},
                              "r2": uni["r2"].round(4), "at_bound": uni["at_bound"],
                              "held-out size": uni["holdout_status"]})
        s = self.settings
        return "\n".join([
            summary[summary["view"].isin(main)].to_string(index=False),
            f"\nunified law ({s.loss} loss, weights {s.weights}; [95%] from {s.n_boot} "
            f"{s.interval} bootstrap replicates):",
            brief.to_string(index=False),
            "\nvariance across subsets, Var = C/k and C(M-k)/(k(M-1)):",
            var.loc[var["view"].isin(main),
                    ["size", "method", "view", "M", "C_inv_k", "r2_inv_k", "C_finite_pool",
                     "r2_finite_pool", "loglog_slope"]].to_string(index=False),
            f"\n{len(self.fits.per_size)} per-size, {len(self.fits.unified)} unified and "
            f"{len(self.fits.variance)} variance fits -> {self.out_dir}",
        ])


def run_fit(losses: pd.DataFrame, out_dir: str | os.PathLike, fit_config: Mapping | None = None,
            **overrides) -> FitRun:
    """The fit step: every fit of ``losses`` (all views: ``fit_all(views="all")``) with the
    settings of ``FitSettings.resolve(fit_config, **overrides)``, written by ``write_fits``
    into ``out_dir``."""
    settings = FitSettings.resolve(fit_config, **overrides)
    fits = fit_all(losses, views="all", weights=settings.weights, loss=settings.loss,
                   f_scale=settings.f_scale, n_boot=settings.n_boot, seed=settings.seed,
                   interval=settings.interval)
    tables = write_fits(fits, out_dir)
    return FitRun(fits=fits, settings=settings, out_dir=Path(out_dir), tables=tables)
