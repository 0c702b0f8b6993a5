"""The merging scaling laws of arXiv 2509.24244, fitted to a losses table.

* per-size law (Eq. 3):  E[L | k] = L_inf + A / (k + b)                     (``per_size``)
* unified law (Eqs. 1, 4): E[L | N, k] = L* + B N^-beta + A0 N^-gamma / (k + b), N in
  billions of parameters (``params / 1e9``)                                 (``unified``)
* variance across subsets: Var(k) = C/k and C (M-k) / (k (M-1))             (``variance``)

Modules, each importing only those above it:

* ``records``: the base of the typed results (``Record``, ``Interval``, ``jsonable``);
* ``views``: the losses table and its views (cross_domain, in_domain, held_out,
  domain:<d>), the per-(size, k) means every law is fitted to;
* ``solvers``: weights, weighted least squares, variable projection over b, the Huber loss;
* ``per_size``, ``unified``, ``variance``: each law, its fit and its typed result;
* ``holdout``: the held-out-size and held-out-k checks;
* ``intervals``: the parametric bootstrap's pieces (cell noise from the variance law, the
  unified law refitted for many replicates at once);
* ``bootstrap``: percentile-bootstrap intervals, parametric (the default) or resampling the
  merged subsets (``interval``, config ``fit.interval``);
* ``results``: ``Fits`` (what ``fits.json`` holds), ``load_fits`` and the tables;
* ``runner``: ``fit_all`` and ``run_fit``, the fit step that writes the fit files.

Everything a caller needs is importable from ``mergelaws.laws``.  Nothing here imports torch.
"""

from mergelaws.laws.bootstrap import (
    PARAMS,
    bootstrap_draws,
    bootstrap_per_size,
    bootstrap_unified,
    fit_per_size_batch,
    summarise_draws,
    summarise_unified,
    unified_draws,
)
from mergelaws.laws.holdout import (
    MIN_SIZES_HOLDOUT,
    holdout_errors,
    holdout_largest_size,
)
from mergelaws.laws.intervals import (
    DEFAULT_INTERVAL,
    INTERVALS,
    cell_noise_sd,
    check_interval,
    fit_unified_batch,
)
from mergelaws.laws.per_size import (
    DEFAULT_B_BOUNDS,
    FinitePoolFit,
    PerSizeFit,
    finite_pool_fit,
    fit_per_size,
    predict_per_size,
)
from mergelaws.laws.records import Interval, LawFit, Record, jsonable
from mergelaws.laws.results import (
    Fits,
    as_fits,
    fits_json,
    load_fits,
    summary_frame,
    unified_frame,
    variance_frame,
)
from mergelaws.laws.runner import (
    FitRun,
    FitSettings,
    FitSettingsError,
    fit_all,
    run_fit,
    write_fits,
)
from mergelaws.laws.solvers import (
    HUBER_TUNING,
    LOSSES,
    check_loss,
    huber_rho,
    huber_weights,
    robust_scale,
)
from mergelaws.laws.unified import (
    DEFAULT_UNIFIED_BOUNDS,
    UNIFIED_PARAMS,
    HoldoutCheck,
    UnifiedFit,
    fit_unified,
    predict_unified,
)
from mergelaws.laws.variance import (
    VARIANCE_LAWS,
    VarianceFit,
    fit_variance,
    predict_variance,
)
from mergelaws.laws.views import (
    VIEWS,
    fit_views,
    normalise_losses,
    per_subset_values,
    pool_sizes,
    subset_values,
    view_names,
    view_table,
)

__all__ = [
    # views
    "VIEWS", "view_names", "fit_views", "normalise_losses", "subset_values", "per_subset_values",
    "view_table", "pool_sizes",
    # results
    "Record", "LawFit", "Interval", "jsonable", "PerSizeFit", "FinitePoolFit", "UnifiedFit",
    "HoldoutCheck", "VarianceFit", "Fits", "load_fits", "as_fits", "fits_json",
    # laws
    "LOSSES", "HUBER_TUNING", "check_loss", "huber_rho", "huber_weights", "robust_scale",
    "DEFAULT_B_BOUNDS", "fit_per_size", "predict_per_size", "finite_pool_fit",
    "DEFAULT_UNIFIED_BOUNDS", "UNIFIED_PARAMS", "fit_unified", "predict_unified",
    "VARIANCE_LAWS", "fit_variance", "predict_variance",
    "MIN_SIZES_HOLDOUT", "holdout_largest_size", "holdout_errors",
    # intervals
    "INTERVALS", "DEFAULT_INTERVAL", "cell_noise_sd", "check_interval", "fit_unified_batch",
    "PARAMS", "fit_per_size_batch", "bootstrap_draws", "bootstrap_per_size", "summarise_draws",
    "unified_draws", "summarise_unified", "bootstrap_unified",
    # the fit step
    "fit_all", "summary_frame", "unified_frame", "variance_frame", "FitSettings",
    "FitSettingsError", "FitRun", "write_fits", "run_fit",
]
