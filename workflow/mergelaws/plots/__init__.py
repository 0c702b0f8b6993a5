"""Paper-style figures for merging scaling laws: one function per figure.

* ``style``: the shared look (sizes, fonts, styles per base size and per method, the legend
  below the panels, the atomic PNG + PDF writer);
* ``curves``: loss and variance across subsets vs k, per method (``plot_loss_vs_k``,
  ``plot_variance_vs_k``);
* ``paper``: the analogues of the paper's main figures on one view, drawn together by
  ``paper_figures`` (Figs 1, 3, 4a, 4b, 5, 7);
* ``multitask``: per-domain radar of merges against the multitask model, with their measured
  compute (Fig 2, ``plot_radar``);
* ``pool``, ``synergy``, ``grids``: the further analyses (pool size, Fig 6; synergy, Fig 21;
  ΔL(k) with k80/k90, Fig 9b; every subset per method, Figs 13–15; per-domain grids,
  Figs 16–19; CE vs N per k, Fig 22), drawn together with their tables by ``more_figures``;
* ``orders``: the optional figures, drawn by ``order_figures`` when the config and inputs
  allow (dispersion across merge orders, Fig 8; experts' fine-tuning loss, Fig 11; sampled
  orders vs full enumeration, Fig 12; names: ``mergelaws.orders.figure_outputs``).

Everything a caller needs is importable from ``mergelaws.plots``.
"""

from mergelaws.plots.curves import (
    plot_loss_vs_k,
    plot_variance_vs_k,
    variance_fit_index,
)
from mergelaws.plots.grids import (
    gain_table,
    plot_ce_vs_N_per_k,
    plot_domain_grid,
    plot_gain,
)
from mergelaws.plots.more import more_figures, more_outputs, write_table
from mergelaws.plots.paper import (
    PAPER_FIGURES,
    _return_curves,  # noqa: F401  (tests)
    paper_figures,
    plot_floor_tail_vs_N,
    plot_forecast,
    plot_fractional_return,
    plot_methods,
    plot_subset_scatter,
    plot_unified_fit,
)
from mergelaws.plots.multitask import multitask_reference, plot_radar, radar_table
from mergelaws.plots.orders import (
    order_figures,
    plot_expert_losses,
    plot_order_dispersion,
    plot_sampled_vs_full,
)
from mergelaws.plots.pool import plot_pool_size
from mergelaws.plots.style import DPI, FORMATS, figure_size, size_label
from mergelaws.plots.synergy import default_synergy_method, plot_synergy

__all__ = ["DPI", "FORMATS", "PAPER_FIGURES", "default_synergy_method", "figure_size", "gain_table",
           "more_figures", "more_outputs", "multitask_reference", "order_figures",
           "plot_expert_losses", "plot_order_dispersion", "plot_sampled_vs_full", "plot_radar", "radar_table", "paper_figures", "plot_ce_vs_N_per_k", "plot_domain_grid",
           "plot_floor_tail_vs_N", "plot_forecast", "plot_fractional_return", "plot_gain",
           "plot_loss_vs_k", "plot_methods", "plot_pool_size", "plot_subset_scatter", "plot_synergy",
           "plot_unified_fit", "plot_variance_vs_k", "size_label", "variance_fit_index", "write_table"]
