"""Planning from the fitted merging laws (arXiv 2509.24244: the planning quantities derived from
its Eqs. 3-4, App. J).

Pure functions on one per-size law ``{"L_inf", "A", "b"}`` (L(k) = L_inf + A/(k+b)):

* ``experts_needed``: smallest integer k >= 1 with L(k) <= target (None when the floor
  L_inf is not below the target, or when k would exceed ``k_max``);
* ``k_epsilon``: k_eps = A/eps - b (App. J.1; the tail above the floor is <= eps), rounded up,
  and ``k_marginal``: the first k whose marginal gain L(k) - L(k+1) is below eps;
* ``k_fraction``: k80 / k90 on the fitted curve or on the measured monotone envelope;
* ``three_point_forecast``: the law through k in {1, 2, 4} only, forecast at k = 1..M;
* ``budget_options`` / ``cheapest_for_target`` / ``best_for_budget``: (size, k) trade-offs;
* ``compare_methods``: the best method per (size, k), paired over shared subsets;
* ``unified_rows`` / ``variance_rows``: the unified law (with intervals) and the variance
  laws of the plan's view, from the fits file (or fitted here).

The fits file is read as typed ``laws.Fits`` (``laws.load_fits``); the plan fits with its
weights and loss (least squares or Huber) (``fit_choice``) and says which.

``write_plan`` runs all of them on a losses table and writes ``plan.md`` and ``plan.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mergelaws import io
from mergelaws.laws import Fits
from mergelaws.plan.answers import (
    best_for_budget,
    budget_options,
    cheapest_for_target,
    compare_methods,
    expert_costs,
    experts_needed,
    k_epsilon,
    k_fraction,
    k_marginal,
    law_value,
    three_point_forecast,
)
from mergelaws.plan.build import (
    THEORY_COLUMNS,
    auto_targets,
    build_plan,
    fit_choice,
    unified_rows,
    variance_rows,
)
from mergelaws.plan.markdown import render_markdown

__all__ = [
    "THEORY_COLUMNS",
    "law_value",
    "experts_needed",
    "k_epsilon",
    "k_marginal",
    "k_fraction",
    "three_point_forecast",
    "expert_costs",
    "budget_options",
    "cheapest_for_target",
    "best_for_budget",
    "compare_methods",
    "auto_targets",
    "fit_choice",
    "unified_rows",
    "variance_rows",
    "build_plan",
    "render_markdown",
    "write_plan",
]


def write_plan(losses: pd.DataFrame, fits: Fits | Mapping | None, out_dir, targets=None, eps: float = 0.01,
               costs: Mapping | None = None, **kwargs) -> list[Path]:
    """Write ``plan.md`` and ``plan.json`` to ``out_dir`` (atomically); returns their paths.

    ``fits``: the ``Fits`` of ``laws.fit_all`` or ``laws.load_fits`` (or a fits.json
    mapping), whose per-size fits of ``view`` are the point estimates (missing ones are
    refitted), or None.  ``targets``: None (per size, midway
    between the measured k = 1 mean and the fitted floor of the reference method), a number,
    a ``{size: target}`` dict or a list in size order.  ``costs``: per size, an expert cost
    or ``{"expert": .., "merge": ..}`` (default ∝ params).  Other keyword arguments go to
    ``build_plan`` (view, n_boot, seed, reference_method, merge_fraction, budgets, k_max, and
    weights / loss / f_scale, which default to the fits file's settings).
    """
    plan = build_plan(losses, fits, targets=targets, eps=eps, costs=costs, **kwargs)
    out = Path(out_dir)
    md, js = out / "plan.md", out / "plan.json"
    io.write_text(js, json.dumps(plan, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    io.write_text(md, render_markdown(plan))
    return [md, js]
