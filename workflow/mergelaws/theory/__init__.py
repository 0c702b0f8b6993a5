"""Theorem 3.1 of PAPER (Sec 3): the merging curve predicted from the experts alone.

* ``quantities``: loss, g^T v_i and the Gauss-Newton Gram v_i^T H v_j on the sweep's eval tokens
  (JVPs), exact losses at merged points, the cheap gradient-only surrogate;
* ``predict``: the quadratic model's subset losses, exact finite-pool E[L|k], variance, the
  theorem's L_inf and A, and the per-expert curvature calibration;
* ``score``: the comparison with a measured sweep and its figure;
* ``run``: `mergelaws predict`.
"""

from mergelaws.theory.predict import (LINEAR_METHODS, TheoremTerms, calibrate, expected_loss, quadratic_loss,
                                      subset_variance, theorem_terms)
from mergelaws.theory.quantities import DomainQuantities, Expansion, gradient_at, gram_at, losses_at
from mergelaws.theory.run import VARIANTS, run_predict

__all__ = ["LINEAR_METHODS", "TheoremTerms", "calibrate", "expected_loss", "quadratic_loss", "subset_variance",
           "theorem_terms", "DomainQuantities", "Expansion", "gradient_at", "gram_at", "losses_at", "VARIANTS",
           "run_predict"]
