"""Model merging: the method registry, the methods, whole-model merges, checkpoints, the sweep's engine.

The modules, each along one seam (lower ones never import higher ones):

* :mod:`~mergelaws.merging.registry`: method names, parameters, defaults, ranges (:func:`register`,
  :func:`resolve_params`, :func:`params_json_schema`) and each method's mergekit form.
* :mod:`~mergelaws.merging.sparsify`: TIES's trim and keep counts, the O(n) selection
  :func:`kth_smallest`, DARE / Breadcrumbs / DELLA sparsification, blockwise tools.
* the methods, one module per family, registered in this order (= :func:`method_names`):
  :mod:`~mergelaws.merging.linear` (average, task_arithmetic), :mod:`~mergelaws.merging.ties`,
  :mod:`~mergelaws.merging.dare`, :mod:`~mergelaws.merging.gta` (dare_ties, breadcrumbs, della:
  sparsify, then :func:`combine_deltas`), :mod:`~mergelaws.merging.model_stock`,
  :mod:`~mergelaws.merging.fourier` (fr_merging, free_merging: a frequency filter, sign election, sum;
  free_merging is task-aware: the sweep adds the eval domain's own sparse expert).
* :mod:`~mergelaws.merging.model`: one tensor (:func:`merge_deltas`) or whole state dicts
  (:func:`merge_state_dicts`), per-tensor seeds (:func:`tensor_seed`).
* :mod:`~mergelaws.merging.checkpoint`: safetensors read and written one tensor at a time.
* :mod:`~mergelaws.merging.engine`: many subsets of one pool of experts (:class:`SubsetMerger`).
* :mod:`~mergelaws.merging.mergekit`: ``mergelaws merge``, a mergekit-format YAML merged to disk
  (with :mod:`~mergelaws.merging.mergekit_config` and :mod:`~mergelaws.merging.mergekit_vocab`);
  not imported here (``from mergelaws.merging import mergekit``).
"""

from __future__ import annotations

from mergelaws.merging.registry import (METHODS, REGISTRY, SCALE_DOC, MergekitForm, MergeMethod, Param,
                                        UnknownMethodError, get_method, method_names, params_json_schema, register,
                                        resolve_params)
from mergelaws.merging.sparsify import (RESCALE_CHOICES, TIES_KEEP_ROUNDING, breadcrumbs_counts, della_keep_probs,
                                        kth_smallest, rescale_kept, sparsify_breadcrumbs, sparsify_dare,
                                        sparsify_della, ties_keep_count, trim)

# the method families: importing them registers their methods, in the order of method_names()
from mergelaws.merging import linear, ties, dare, gta, model_stock, fourier  # noqa: F401  (this order)
from mergelaws.merging.gta import combine_deltas
from mergelaws.merging.model_stock import model_stock_ratio
from mergelaws.merging.fourier import free_expert, frequency_filter, frequency_mask, spectrum_kept
from mergelaws.merging.model import (global_trim_state_from, merge_deltas, merge_state_dicts,
                                     task_vectors, tensor_seed)
from mergelaws.merging.checkpoint import (CheckpointError, DictSource, RowCutSource, SafetensorsSource,
                                          SafetensorsWriter, as_source)
from mergelaws.merging.engine import (SUM_METHODS, MergeCost, SubsetMerger, merge_memory_estimate,
                                      reuse_order, sum_coefficient)

__all__ = [
    # registry
    "Param", "MergekitForm", "MergeMethod", "REGISTRY", "METHODS", "SCALE_DOC", "UnknownMethodError", "register",
    "method_names", "get_method", "resolve_params", "params_json_schema",
    # sparsification
    "TIES_KEEP_ROUNDING", "RESCALE_CHOICES", "ties_keep_count", "kth_smallest", "trim", "rescale_kept",
    "sparsify_dare", "breadcrumbs_counts", "sparsify_breadcrumbs", "della_keep_probs", "sparsify_della",
    "combine_deltas", "model_stock_ratio", "frequency_mask", "frequency_filter", "spectrum_kept", "free_expert",
    # whole models
    "tensor_seed", "merge_deltas", "task_vectors", "global_trim_state_from", "merge_state_dicts",
    # checkpoints
    "CheckpointError", "SafetensorsSource", "DictSource", "RowCutSource", "as_source", "SafetensorsWriter",
    # the sweep's engine
    "SUM_METHODS", "sum_coefficient", "reuse_order", "MergeCost", "SubsetMerger", "merge_memory_estimate",
]
