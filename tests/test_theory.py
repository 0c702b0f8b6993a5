"""mergelaws.theory (`mergelaws predict`): known answers for the machinery, then one small run.

* a quadratic loss, where the model's subset losses, finite-pool mean and variance are exact;
* a tiny Llama, where the JVP Gram equals v_i^T (J^T (diag p - p p^T) J) v_j from the dense
  Jacobian, the JVP equals a central finite difference and g^T v_i equals the autograd gradient's;
* the shipped xs base with three quickly made experts, swept and predicted end to end.
"""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import domain_specs, noise_experts
import torch

from mergelaws.data import IGNORE, Example
from mergelaws.theory import predict as P
from mergelaws.theory.quantities import (DomainQuantities, finite_difference_logits, gradient_at, gram_at,
                                         jvp_logits, losses_at, point_params)

ROOT = Path(__file__).resolve().parents[1]


# ---- a quadratic loss: every prediction is exact ----------------------------------------------

def _quadratic(seed=0, dim=7, M=5):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(dim, dim))
    H = A @ A.T / dim
    g0 = rng.normal(size=dim)
    V = rng.normal(size=(M, dim)) * 0.5

    def loss(theta):
        return float(1.3 + g0 @ theta + 0.5 * theta @ H @ theta)

    def quantities(beta0):
        te = beta0 @ V
        return DomainQuantities("q", 1, loss(te), V @ (g0 + H @ te), V @ H @ V.T)

    quantities.H = H
    return V, loss, quantities


@pytest.mark.parametrize("method,params", [("average", {"scale": 1.0}),
                                           ("task_arithmetic", {"scale": 0.8, "combine": "mean"}),
                                           ("task_arithmetic", {"scale": 0.3, "combine": "sum"})])
@pytest.mark.parametrize("point", ["theta0", "center"])
def test_quadratic_loss_is_predicted_exactly(method, params, point):
    V, loss, quantities = _quadratic()
    M = len(V)
    experts = [f"e{i}" for i in range(M)]
    beta0 = np.zeros(M) if point == "theta0" else P.center_beta(method, params, M)
    q = quantities(beta0)
    for k in range(M + 1):
        coef = P.coefficient(method, params, k)
        exact = []
        for S in itertools.combinations(experts, k):
            beta = P.subset_beta(S, experts, coef)
            exact.append(loss(beta @ V))
            assert P.quadratic_loss(q, beta - beta0) == pytest.approx(exact[-1], rel=1e-10, abs=1e-10)
        # exact finite-pool expectation and variance vs brute-force enumeration of the k-subsets
        assert P.expected_loss(q, beta0, coef, k) == pytest.approx(np.mean(exact), rel=1e-10)
        if 0 < k < M:
            assert P.subset_variance(q, beta0, coef, experts, k) == pytest.approx(np.var(exact), rel=1e-8)


def test_theorem_terms_are_the_finite_pool_curve_of_average():
    """E[L|k] = L_inf + A (M-k)/(k(M-1)) with L_inf = L + c g^T mu + c^2/2 mu^T H mu, A = c^2/2 Tr(H Sigma)."""
    V, loss, quantities = _quadratic(seed=3)
    M = len(V)
    c = 0.7
    params = {"scale": c}
    mu = V.mean(0)
    for beta0 in (np.zeros(M), P.center_beta("average", params, M)):
        q = quantities(beta0)
        t = P.theorem_terms(q, beta0, c)
        assert t.L_inf == pytest.approx(loss(c * mu), rel=1e-10)
        Sigma = (V - mu).T @ (V - mu) / M
        assert t.A == pytest.approx(0.5 * c * c * np.trace(quantities.H @ Sigma), rel=1e-10)
        for k in range(1, M + 1):
            assert t.finite_pool_mean(k, M) == pytest.approx(P.expected_loss(q, beta0, c / k, k), rel=1e-10)


def test_finite_pool_factor_matches_brute_force():
    """Var of the mean of k draws without replacement from M: (M-k)/(k(M-1)) sigma^2 (population)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=9)
    M = len(x)
    for k in range(1, M + 1):
        means = [np.mean(s) for s in itertools.combinations(x, k)]
        assert np.var(means) == pytest.approx(np.var(x) * (M - k) / (k * (M - 1)), rel=1e-10, abs=1e-14)


def test_calibration_keeps_an_exact_quadratic_and_fits_the_single_expert_losses():
    V, loss, quantities = _quadratic(seed=2)
    M = len(V)
    beta0 = P.center_beta("average", {"scale": 1.0}, M)
    q = quantities(beta0)
    k1 = np.array([loss(V[i]) for i in range(M)])
    cal, s = P.calibrate(q, beta0, 1.0, k1)
    np.testing.assert_allclose(s, 1.0, atol=1e-6)
    # a curvature twice too large is halved back (s = 1/sqrt 2), so every subset is exact again
    wrong = DomainQuantities("q", 1, q.loss, q.a, 2 * q.G)
    cal, s = P.calibrate(wrong, beta0, 1.0, k1)
    np.testing.assert_allclose(s, 1 / math.sqrt(2), rtol=1e-5)
    np.testing.assert_allclose(cal.G, q.G, rtol=1e-5, atol=1e-8)


# ---- a tiny model: JVP Gram vs the dense Gauss-Newton matrix ----------------------------------

@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(cfg).float().eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    vectors = [{n: 0.2 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(3)]
    rng = np.random.default_rng(0)
    evalsets = {}
    for d in ("one", "two"):
        exs = []
        for _ in range(3):
            n = int(rng.integers(5, 9))
            ids = rng.integers(1, 11, size=n).tolist()
            cut = int(rng.integers(1, n - 1))
            exs.append(Example(ids, [IGNORE] * cut + ids[cut:]))
        evalsets[d] = exs
    return model, base, vectors, evalsets


def _dense_gn(model, base, vectors, examples, beta0):
    """v_i^T H v_j with H = sum_t J_t^T (diag p_t - p_t p_t^T) J_t / n from the full Jacobian."""
    from mergelaws.data import pad_batch
    from mergelaws.theory.quantities import eager_attention, target_logits_fn

    names = list(base)
    params = point_params(base, vectors, beta0)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].flatten() for n in names])
    Vf = torch.stack([torch.cat([v[n].flatten() for n in names]) for v in vectors]).double()
    H = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
    grad = torch.zeros(len(flat0), dtype=torch.float64)
    n_tok, nll = 0, 0.0
    with eager_attention(model):
        for ex in examples:
            ids, att, lab = pad_batch([ex], 0)
            f, targets = target_logits_fn(model, ids, att, lab)

            def from_flat(x):
                return f({n: t.view(s) for n, t, s in zip(names, torch.split(x, sizes), shapes)})

            J = torch.func.jacrev(from_flat)(flat0).double()  # (T, V, P)
            logits = from_flat(flat0).double()
            p = torch.softmax(logits, -1)
            for t in range(J.shape[0]):
                Jt = J[t]
                Ht = torch.diag(p[t]) - torch.outer(p[t], p[t])
                H += Jt.T @ Ht @ Jt
                onehot = torch.nn.functional.one_hot(targets[t], p.shape[1]).double()
                grad += Jt.T @ (p[t] - onehot)
                nll -= float(torch.log(p[t, targets[t]]))
            n_tok += J.shape[0]
    return (Vf @ H @ Vf.T / n_tok).numpy(), (Vf @ grad / n_tok).numpy(), nll / n_tok


@pytest.mark.parametrize("point", ["theta0", "center"])
def test_jvp_gram_equals_dense_gauss_newton(tiny, point):
    model, base, vectors, evalsets = tiny
    M = len(vectors)
    beta0 = np.zeros(M) if point == "theta0" else np.full(M, 1 / M)
    x = gram_at(model, base, vectors, evalsets, pad_id=0, beta0=beta0, point=point, batch_tokens=16)
    assert x.jvp_passes > 0
    for d, examples in evalsets.items():
        G, a, L = _dense_gn(model, base, vectors, examples, beta0)
        q = x.domains[d]
        np.testing.assert_allclose(q.G, G, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(q.a, a, rtol=2e-4, atol=1e-6)
        assert q.loss == pytest.approx(L, rel=1e-5)
        assert np.all(np.linalg.eigvalsh(q.G) > -1e-8)  # PSD
    # the exact loss at the expansion point, evaluated the sweep's way, is the Gram's L
    exact = losses_at(model, base, vectors, [beta0], evalsets, pad_id=0)
    np.testing.assert_allclose(exact[0], [x.domains[d].loss for d in evalsets], rtol=1e-5)
    # the gradient-only surrogate has the same L and g^T v_i (by autograd)
    y = gradient_at(model, base, vectors, evalsets, pad_id=0, beta0=beta0)
    for d in evalsets:
        np.testing.assert_allclose(y.domains[d].a, x.domains[d].a, rtol=2e-4, atol=1e-6)
        assert y.domains[d].loss == pytest.approx(x.domains[d].loss, rel=1e-5)


def test_jvp_equals_central_finite_difference(tiny):
    model, base, vectors, evalsets = tiny
    from mergelaws.theory.quantities import eager_attention

    ex = evalsets["one"][0]
    with eager_attention(model):
        u = jvp_logits(model, base, vectors[0], ex, pad_id=0).double()
        fd = finite_difference_logits(model, base, vectors[0], ex, pad_id=0, eps=1e-3)
    assert torch.allclose(u, fd, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(u, torch.zeros_like(u), atol=1e-2)


def test_quadratic_model_error_shrinks_like_the_cube_of_the_step(tiny):
    """On the real model, the quadratic model at theta_0 is second-order accurate."""
    model, base, vectors, evalsets = tiny
    M = len(vectors)
    errs = []
    for t in (0.1, 0.05):
        small = [{n: t * v[n] for n in v} for v in vectors]
        x = gram_at(model, base, small, evalsets, pad_id=0)
        beta = np.array([0.5, 0.5, 0.0])
        exact = losses_at(model, base, small, [beta], evalsets, pad_id=0)[0]
        pred = [P.quadratic_loss(x.domains[d], beta) for d in evalsets]
        errs.append(np.max(np.abs(exact - pred)))
    assert errs[1] < errs[0] / 4  # O(t^3): halving t divides the error by ~8


# ---- end to end on the shipped xs base ----------------------------------------------------------

DOMS = ["code", "quotes", "algebra"]


@pytest.fixture(scope="module")
def xs_run(tmp_path_factory):
    from mergelaws import config
    from mergelaws.sweep import aggregate, run_sweep

    work = tmp_path_factory.mktemp("theory")
    xs = ROOT / "data" / "bases" / "xs"
    dirs = noise_experts(work, DOMS, 300, 0.02)
    raw = {"results": str(work / "results"),
           "domains": domain_specs(DOMS),
           "bases": {"xs": {"model": str(xs)}},
           "methods": {"average": {}, "ties": {"density": 0.5}},
           "sweep": {"k": "all", "subsets_per_k": 3, "device": "cpu"},
           "eval": {"max_examples": 4, "max_len": 48}}
    cfg = config.validate(raw)
    run_sweep(copy.deepcopy(cfg), "xs", "average", work / "sweep.parquet", expert_dirs=dirs, log=lambda *_: None)
    aggregate([work / "sweep.parquet"], work / "losses.parquet")
    return work, cfg, dirs


def test_predict_end_to_end(xs_run):
    from mergelaws.theory import run_predict

    work, cfg, dirs = xs_run
    logs = []
    out = work / "theory" / "xs.parquet"
    summ = run_predict(copy.deepcopy(cfg), "xs", out, losses=work / "losses.parquet", expert_dirs=dirs,
                       log=logs.append)
    pred = pd.read_parquet(out)
    assert set(pred["variant"]) == {"theta0", "center", "calibrated", "weights"}
    assert set(pred["method"]) == {"average"}
    assert "ties" in summ["out_of_scope"] and any("ties not predicted" in s for s in logs)
    losses = pd.read_parquet(work / "losses.parquet")
    full = losses[losses["k"] == len(DOMS)].set_index("eval_domain")["loss"]
    for variant in ("center", "calibrated", "weights"):  # expanded at the merge of all: exact there
        got = pred[(pred["variant"] == variant) & (pred["k"] == len(DOMS))].set_index("eval_domain")["loss"]
        np.testing.assert_allclose(got[full.index], full, rtol=1e-4)
    ones = losses[losses["k"] == 1].set_index(["members", "eval_domain"])["loss"]
    cal = pred[(pred["variant"] == "calibrated") & (pred["k"] == 1)].set_index(["members", "eval_domain"])["loss"]
    np.testing.assert_allclose(cal[ones.index], ones, rtol=1e-3)  # calibrated on the single experts
    scores = pd.read_csv(work / "theory" / "xs_compare.csv")
    assert set(scores["variant"]) == {"theta0", "center", "calibrated", "weights"}
    center = scores[scores["variant"] == "center"].iloc[0]
    assert center["spearman"] > 0.9
    assert (work / "theory" / "xs_compare.png").stat().st_size > 0
    assert (work / "theory" / "xs.json").exists()
    e = summ["methods"]["average"]["center"]
    assert len(e["expected"]) == len(DOMS) + 1 and e["theorem"]["A"] > 0


def test_predict_bad_input_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mergelaws.cli", "predict", "--size", "nope", "--out",
                        str(tmp_path / "x.parquet")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "size 'nope'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
