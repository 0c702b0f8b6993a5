"""Predictions of the quadratic model (PAPER Theorem 3.1, Corollary 3.2) from an ``Expansion``.

A linear merge of a subset S of the M experts is theta_S = theta_0 + sum_i beta_S,i v_i with
beta_S = coef(k) 1_S (``merging.sum_coefficient``: c/k for average and task_arithmetic with
combine 'mean', c for 'sum'). At the expansion point theta_e = theta_0 + sum_i beta0_i v_i the
quadratic model of every eval domain is

    L(theta_S) = L(theta_e) + d^T a + 1/2 d^T G d,      d = beta_S - beta0,

with a = (g^T v_i), G = (v_i^T H v_j): exact for a quadratic loss. Its mean over the k-subsets
of the pool is exact too: E[1_S] = k/M 1, E[1_S 1_S^T] = k/M I + k(k-1)/(M(M-1)) (1 1^T - I), which
for average gives the theorem's L_inf + A (M-k)/(k(M-1)) (the finite-pool factor, PAPER Sec 3 note)
with L_inf = L + c g^T mu + c^2/2 mu^T H mu and A = c^2/2 Tr(H Sigma), Sigma the pool's covariance.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from mergelaws.theory.quantities import DomainQuantities, Expansion

#: methods whose merge is theta_0 + coef(k) sum_{i in S} v_i, predicted exactly by the model
LINEAR_METHODS = ("average", "task_arithmetic")


def coefficient(method: str, params: dict, k: int) -> float | None:
    """coef(k) with theta_S = theta_0 + coef(k) sum_{i in S} v_i; None for a non-linear method."""
    from mergelaws.merging.engine import sum_coefficient

    if method not in LINEAR_METHODS or k == 0:
        return 0.0 if method in LINEAR_METHODS else None
    return sum_coefficient(method, params, k)


def center_beta(method: str, params: dict, M: int) -> np.ndarray:
    """beta0 of theta_0 + c mu, the merge of all M experts."""
    return np.full(M, coefficient(method, params, M))


def subset_beta(members, experts: list[str], coef: float) -> np.ndarray:
    beta = np.zeros(len(experts))
    for m in members:
        beta[experts.index(m)] = coef
    return beta


def quadratic_loss(q: DomainQuantities, d: np.ndarray) -> float:
    """L + d^T a + 1/2 d^T G d."""
    return float(q.loss + d @ q.a + 0.5 * d @ q.G @ d)


def expected_loss(q: DomainQuantities, beta0: np.ndarray, coef: float, k: int) -> float:
    """Exact mean of the quadratic model over all k-subsets of the M experts (finite pool)."""
    M = len(beta0)
    if k == 0:
        return quadratic_loss(q, -beta0)
    e1 = np.full(M, k / M)
    pair = k * (k - 1) / (M * (M - 1)) if M > 1 else 0.0
    E2 = coef ** 2 * (np.full((M, M), pair) + np.eye(M) * (k / M - pair))  # E[beta beta^T]
    Ed = coef * e1 - beta0
    # E[d^T G d] = Tr(G E[beta beta^T]) - 2 beta0^T G E[beta] + beta0^T G beta0
    quad = np.sum(q.G * E2) - 2 * beta0 @ q.G @ (coef * e1) + beta0 @ q.G @ beta0
    return float(q.loss + Ed @ q.a + 0.5 * quad)


@dataclass
class TheoremTerms:
    """The theorem's named quantities for one domain (or the macro mean), merge scale c."""

    L_inf: float  # L(theta_e) + c g^T (mu - mu_e) + c^2/2 (mu - mu_e)^T H (mu - mu_e)
    A: float  # c^2/2 Tr(H Sigma)
    mu_H_mu: float  # mu^T H mu
    tr_H_sigma: float  # Tr(H Sigma)
    var_coef: float  # a^T Sigma a, a = g + H c (mu - mu_e): Var ~ c^2/k a^T Sigma a (x finite-pool factor)

    def finite_pool_mean(self, k, M: int):
        """E[L|k] = L_inf + A (M-k)/(k(M-1))."""
        k = np.asarray(k, dtype=float)
        return self.L_inf + self.A * (M - k) / (k * (M - 1))


def theorem_terms(q: DomainQuantities, beta0: np.ndarray, c: float) -> TheoremTerms:
    """L_inf and A of Theorem 3.1 for the average of all M (mean coefficient c / M per expert)."""
    M = len(beta0)
    one = np.full(M, 1.0 / M)  # mu = sum_i v_i / M in coefficients
    P = np.eye(M) - 1.0 / M  # centering: columns v_i - mu
    d = c * one - beta0
    L_inf = q.loss + d @ q.a + 0.5 * d @ q.G @ d
    tr = float(np.trace(P @ q.G @ P)) / M  # Tr(H Sigma), Sigma = 1/M sum (v_i - mu)(v_i - mu)^T
    grad = q.a + q.G @ d  # (g + H c(mu - mu_e))^T v_i
    var = float(np.mean((P @ grad) ** 2))
    return TheoremTerms(float(L_inf), 0.5 * c * c * tr, float(one @ q.G @ one), tr, var)


def all_subsets(experts: list[str], k: int, limit: int = 5000, seed: int = 0) -> list[tuple[str, ...]]:
    """Every k-subset of the pool, or a seeded sample of ``limit`` of them when there are more."""
    total = math.comb(len(experts), k)
    if total <= limit:
        return list(itertools.combinations(experts, k))
    rng = np.random.default_rng(seed)
    seen = set()
    while len(seen) < limit:
        seen.add(tuple(sorted(rng.choice(experts, k, replace=False).tolist(), key=experts.index)))
    return sorted(seen)


def subset_variance(q: DomainQuantities, beta0: np.ndarray, coef: float, experts: list[str], k: int) -> float:
    """Population variance of the quadratic model's loss across the k-subsets of the pool."""
    vals = [quadratic_loss(q, subset_beta(s, experts, coef) - beta0) for s in all_subsets(experts, k)]
    return float(np.var(vals))


def calibrate(q: DomainQuantities, beta0: np.ndarray, coef1: float, exact_k1: np.ndarray) -> tuple[DomainQuantities, np.ndarray]:
    """The curvature rescaled per expert, G~ = diag(s) G diag(s), so that the model gives the exact
    losses ``exact_k1`` of the M single-expert merges (the k = 1 points): s >= 0 by bounded least
    squares from s = 1. It keeps L, a and the expansion point, so the k = M merge stays exact when
    the expansion point is theta_0 + c mu. Returns (calibrated quantities, s)."""
    from scipy.optimize import least_squares

    M = len(beta0)
    D = coef1 * np.eye(M) - beta0  # row i: d of the single-expert merge i
    excess = np.asarray(exact_k1, dtype=float) - q.loss - D @ q.a

    def resid(s):
        return 0.5 * np.einsum("ij,jk,ik->i", D, np.outer(s, s) * q.G, D) - excess

    s = least_squares(resid, np.ones(M), bounds=(0.0, np.inf), xtol=1e-12, ftol=1e-12).x
    return DomainQuantities(q.domain, q.tokens, q.loss, q.a, np.outer(s, s) * q.G), s
