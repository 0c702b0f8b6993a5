"""mergelaws.theory (`mergelaws predict`): known answers for the machinery, then one small run.

* a quadratic loss, where the model's subset losses, finite-pool mean and variance are exact;
* a tiny Llama, where the JVP Gram equals v_i^T (J^T (diag p - p p^T) J) v_j from the dense
  Jacobian, the JVP equals a central finite difference and g^T v_i equals the autograd gradient's;
* the sampled variant: seeded per-domain samples, its control variates and level, its cost;
  with both fractions 1 it is the weights variant exactly;
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
import torch
from conftest import domain_specs, noise_experts
from mergelaws.data import IGNORE, Example
from mergelaws.theory import predict as P
from mergelaws.theory.quantities import (
    DomainQuantities,
    finite_difference_logits,
    gradient_at,
    gram_at,
    jvp_logits,
    losses_at,
    point_params,
)

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
    assert set(pred["variant"]) == {"theta0", "center", "calibrated", "weights", "sampled"}
    assert set(pred["method"]) == {"average"}
    assert "ties" in summ["out_of_scope"] and any("ties not predicted" in s for s in logs)
    losses = pd.read_parquet(work / "losses.parquet")
    full = losses[losses["k"] == len(DOMS)].set_index("eval_domain")["loss"]
    for variant in ("center", "calibrated", "weights", "sampled"):  # expanded at the merge of all: exact there
        got = pred[(pred["variant"] == variant) & (pred["k"] == len(DOMS))].set_index("eval_domain")["loss"]
        np.testing.assert_allclose(got[full.index], full, rtol=1e-4)
    ones = losses[losses["k"] == 1].set_index(["members", "eval_domain"])["loss"]
    cal = pred[(pred["variant"] == "calibrated") & (pred["k"] == 1)].set_index(["members", "eval_domain"])["loss"]
    np.testing.assert_allclose(cal[ones.index], ones, rtol=1e-3)  # calibrated on the single experts
    scores = pd.read_csv(work / "theory" / "xs_compare.csv")
    assert set(scores["variant"]) == {"theta0", "center", "calibrated", "weights", "sampled"}
    sampled = scores[scores["variant"] == "sampled"].iloc[0]  # its cost: a fraction of weights'
    assert sampled["forward_equivalents"] < scores[scores["variant"] == "weights"].iloc[0]["forward_equivalents"]
    assert sampled["enumeration_subsets"] == 2 ** len(DOMS) - 1
    assert summ["methods"]["average"]["sampled"]["sample"]["examples"] == {d: 1 for d in DOMS}
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


# ---- the sampled variant: per-domain samples, control variates, its cost ----------------------

def _evalsets(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for d, n in sizes.items():
        exs = []
        for _ in range(n):
            m = int(rng.integers(4, 9))
            ids = rng.integers(1, 11, size=m).tolist()
            exs.append(Example(ids, [IGNORE] * 2 + ids[2:]))
        out[d] = exs
    return out


def test_subsample_is_seeded_stratified_and_nested():
    from mergelaws.theory.quantities import complement, subsample

    sets = _evalsets({"a": 12, "b": 12, "c": 5, "d": 1})
    s1 = subsample(sets, 0.25, seed=3)
    assert {d: len(v) for d, v in s1.items()} == {"a": 3, "b": 3, "c": 2, "d": 1}  # ceil, at least one
    again = subsample(sets, 0.25, seed=3)
    assert all([id(e) for e in s1[d]] == [id(e) for e in again[d]] for d in sets)  # deterministic
    for d, v in s1.items():  # the domain's own examples, in their original order
        idx = [next(i for i, e in enumerate(sets[d]) if e is x) for x in v]
        assert idx == sorted(idx) and len(set(idx)) == len(idx)
    # a domain's sample does not depend on the other domains (seeded by the domain's name)
    alone = subsample({"a": sets["a"]}, 0.25, seed=3)
    assert [id(e) for e in alone["a"]] == [id(e) for e in s1["a"]]
    # another seed draws another sample; a smaller fraction's sample lies inside a larger one's
    assert any([id(e) for e in subsample(sets, 0.25, seed=s)["a"]] != [id(e) for e in s1["a"]] for s in range(4, 9))
    big = subsample(sets, 0.5, seed=3)
    assert all({id(e) for e in s1[d]} <= {id(e) for e in big[d]} for d in sets)
    assert subsample(sets, 1.0) is sets
    rest = complement(sets, big)
    for d in sets:
        assert len(rest[d]) + len(big[d]) == len(sets[d])
        assert not {id(e) for e in rest[d]} & {id(e) for e in big[d]}
    with pytest.raises(ValueError):
        subsample(sets, 0.0)


def test_balanced_order_spreads_every_prefix_over_the_lengths():
    from mergelaws.theory.quantities import balanced_order, subsample

    lengths = [int(x) for x in np.random.default_rng(5).permutation(16)]  # ranks 0..15, shuffled
    rank = {i: lengths[i] for i in range(16)}
    firsts = np.zeros(16)
    for seed in range(4000):
        order = balanced_order(lengths, np.random.default_rng(seed))
        assert sorted(order) == list(range(16))
        for m in (2, 4, 8):  # the first m: one from each of m blocks of the sorted lengths
            assert sorted(rank[i] // (16 // m) for i in order[:m]) == list(range(m))
        firsts[order[0]] += 1
    assert np.abs(firsts / 4000 - 1 / 16).max() < 0.015  # the first item is uniform over all
    # odd sizes: every item once, the first two from the two halves
    for seed in range(50):
        order = balanced_order(list(range(7)), np.random.default_rng(seed))
        assert sorted(order) == list(range(7)) and sorted(i >= 3 for i in order[:2]) == [False, True]
    # a sample of 2 of a domain's examples: one shorter and one longer than its median
    sets = {"a": [Example(list(range(2, 4 + n)), [IGNORE] * 2 + list(range(4, 4 + n)))
                  for n in np.random.default_rng(4).permutation(16) + 1]}  # 1..16 targets
    for seed in range(20):
        two = sorted(e.n_targets for e in subsample(sets, 2 / 16, seed)["a"])
        assert two[0] <= 8 < two[1]


def test_losses_at_one_stream_equals_the_sweeps_per_domain_evaluation(tiny):
    from mergelaws.evaluate import evaluate_examples

    model, base, vectors, evalsets = tiny
    beta = np.array([0.5, 0.0, 0.25])
    got = losses_at(model, base, vectors, [beta], evalsets, pad_id=0, batch_tokens=16)[0]
    live = dict(model.named_parameters())
    saved = {n: live[n].detach().clone() for n in base}
    with torch.no_grad():
        for n, t in point_params(base, vectors, beta).items():
            live[n].copy_(t)
    want = [evaluate_examples(model, evalsets[d], pad_id=0, batch_tokens=16).loss for d in evalsets]
    with torch.no_grad():
        for n, t in saved.items():
            live[n].copy_(t)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    empty = losses_at(model, base, vectors, [beta], {"one": evalsets["one"], "none": []}, pad_id=0)[0]
    assert empty[0] == pytest.approx(got[0], rel=1e-6) and np.isnan(empty[1])


def _token_nlls(model, params, e: Example) -> torch.Tensor:
    """One example's per-target NLL by a forward of that example alone, at ``params``."""
    from torch.func import functional_call

    with torch.no_grad():
        logits = functional_call(model, params, (torch.tensor([e.input_ids]),)).logits[0, :-1]
    lab = torch.tensor(e.labels[1:])
    keep = lab != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep].double(), lab[keep], reduction="none")


def _poststratified_singles(model, base, vectors, beta_c, sample, full) -> np.ndarray:
    """Each single expert's mean NLL difference to the center on ``sample``, post-stratified by
    response position (the last target apart, every other position its own stratum) with the
    strata's shares of ``full``'s targets; a position the sample lacks takes the furthest earlier
    one it has."""
    def stratum(n):
        return ["last" if p == n - 1 else p for p in range(n)]

    M = len(vectors)
    pts = [point_params(base, vectors, np.eye(M)[i]) for i in range(M)] + [point_params(base, vectors, beta_c)]
    per = [[_token_nlls(model, p, e) for p in pts] for e in sample]  # example x point x targets
    labels = [stratum(e.n_targets) for e in sample]
    every = [s for e in full for s in stratum(e.n_targets)]
    out = np.zeros(M)
    for i in range(M):
        diff = [(t[i] - t[M]).numpy() for t in per]
        by = {}
        for x, lab in zip(diff, labels):
            for v, h in zip(x, lab):
                by.setdefault(h, []).append(v)
        for h in every:
            if h not in by:  # a position beyond the sample's: the furthest earlier one it has
                h = max(p for p in by if p != "last" and p < h)
            out[i] += np.mean(by[h]) / len(every)
    return out


def test_response_strata_and_the_poststratified_difference():
    from mergelaws.theory.quantities import (
        n_strata,
        poststratified_difference,
        stratum_counts,
        token_strata,
    )

    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    # rows of 5, 2 and 4 targets: the last is stratum 0, position p otherwise 1 + p
    assert token_strata(mask).tolist() == [1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 0]
    ex = [Example([0] * 7, [IGNORE] * (7 - n) + [1] * n) for n in (5, 2, 4)]  # as the mask's rows
    assert n_strata(ex) == 6 and stratum_counts(ex).tolist() == [3, 3, 2, 2, 1, 0]
    assert stratum_counts(ex, 8).tolist() == [3, 3, 2, 2, 1, 0, 0, 0]
    # a sample whose strata are in the full set's proportions: the plain mean difference
    counts = np.array([[2.0, 2.0, 2.0, 2.0, 8.0]])
    delta = np.array([0.5, 0.5, 0.5, 0.5, 1.5])  # point - center per target token, by stratum
    center = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    point = center + counts * delta  # NLL sums
    got = poststratified_difference(point[None], center, counts, counts * 3)
    assert got.shape == (1, 1) and got[0, 0] == pytest.approx((8 * 0.5 + 8 * 1.5) / 16)
    # the same sample against a full set with twice the share of last tokens
    full = np.array([[4.0, 2.0, 2.0, 2.0, 6.0]])
    assert poststratified_difference(point[None], center, counts, full)[0, 0] == pytest.approx(
        (10 * 0.5 + 6 * 1.5) / 16)
    # positions the sample does not reach (a full set with 2 more strata than the sample's arrays,
    # and a gap at position 1): each takes the furthest earlier position the sample has
    full2 = np.array([[4.0, 2.0, 2.0, 2.0, 6.0, 3.0, 1.0]])
    counts2, point2 = counts * [1, 1, 0, 1, 1], center + counts * delta * [1, 1, 0, 1, 1]
    want = (4 * 0.5 + 2 * 0.5 + 2 * 0.5 + 2 * 0.5 + 6 * 1.5 + 3 * 1.5 + 1 * 1.5) / 20
    assert poststratified_difference(point2[None], center, counts2, full2)[0, 0] == pytest.approx(want)
    # no position at all in the sample (only last targets): the sample's overall difference (0.5)
    counts0, point0 = counts * [1, 0, 0, 0, 0], center + counts * delta * [1, 0, 0, 0, 0]
    assert poststratified_difference(point0[None], center, counts0, full)[0, 0] == pytest.approx(0.5)


def _tiny_inputs(tiny, n_per_domain=8):
    from mergelaws.theory.run import SizeInputs

    model, base, vectors, _ = tiny
    evalsets = _evalsets({"one": n_per_domain, "two": n_per_domain, "three": n_per_domain}, seed=5)
    cfg = {"eval": {"batch_tokens": 32}, "methods": {"average": {"scale": 1.0},
                                                    "task_arithmetic": {"scale": 0.8, "combine": "mean"}}}
    return cfg, SizeInputs("t", model, 0, base, vectors, ["e0", "e1", "e2"], evalsets, 0, 0.0)


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_sampled_with_fractions_one_is_weights_exactly(tiny, method):
    from mergelaws.theory.run import compute_variants, sample_settings

    cfg, inp = _tiny_inputs(tiny)
    sample = sample_settings(cfg, eval_fraction=1.0, gradient_fraction=1.0, backward_dtype="float32")
    w, s = compute_variants(cfg, inp, [method], ["weights", "sampled"], log=lambda *_: None, sample=sample)
    assert (w.variant, s.variant) == ("weights", "sampled")
    for d in inp.evalsets:
        assert s.domains[d].loss == w.domains[d].loss
        np.testing.assert_array_equal(s.domains[d].a, w.domains[d].a)
        np.testing.assert_array_equal(s.domains[d].G, w.domains[d].G)
    assert s.scales == w.scales
    assert s.forward_equivalents == pytest.approx(w.forward_equivalents)  # 3 (gradient) + M (k = 1)


@pytest.mark.parametrize("fk,fg", [(0.25, 0.5), (0.5, 0.25)])
def test_sampled_control_variates_level_and_cost(tiny, fk, fg):
    """fk <= fg: the eval sample lies inside the gradient sample, whose forward passes give the
    center's loss on it; fk > fg: the center is evaluated on the eval sample with the experts."""
    from mergelaws.theory.quantities import complement, subsample
    from mergelaws.theory.run import compute_variants, sample_settings

    cfg, inp = _tiny_inputs(tiny)
    model, base, vectors, M = inp.model, inp.base, inp.vectors, 3
    sample = sample_settings(cfg, eval_fraction=fk, gradient_fraction=fg, seed=7, backward_dtype="float32")
    (r,) = compute_variants(cfg, inp, ["average"], ["sampled"], log=lambda *_: None, sample=sample)
    beta_c = np.full(M, 1 / M)
    sub_k = subsample(inp.evalsets, fk, 7)
    sub_g = subsample(inp.evalsets, fg, 7)
    assert r.sample["examples"] == {d: int(8 * fk) for d in inp.evalsets}
    assert r.sample["gradient_examples"] == {d: int(8 * fg) for d in inp.evalsets}
    # the level is the center's loss on the full eval set (gradient sample + the rest)
    full_c = losses_at(model, base, vectors, [beta_c], inp.evalsets, pad_id=0, batch_tokens=32)[0]
    np.testing.assert_allclose([r.domains[d].loss for d in inp.evalsets], full_c, rtol=1e-6)
    # the gradient (g^T v_i) is the gradient sample's
    g = gradient_at(model, base, vectors, sub_g, pad_id=0, beta0=beta_c, batch_tokens=32)
    # calibrated on the control-variate estimates of the single-expert losses: L_center(full set)
    # plus the sample's L_i - L_center (the same tokens), post-stratified by response position (each
    # example's last target apart, every other position its own stratum, each weighed by its share
    # of the full set's targets), from per-example forwards of every point
    for j, d in enumerate(inp.evalsets):
        np.testing.assert_allclose(r.domains[d].a, g.domains[d].a, rtol=1e-6)
        est = _poststratified_singles(model, base, vectors, beta_c, sub_k[d], inp.evalsets[d]) + full_c[j]
        q = DomainQuantities(d, 0, full_c[j], g.domains[d].a, g.domains[d].G)
        want, s = P.calibrate(q, beta_c, 1.0, est)
        np.testing.assert_allclose(r.scales[d], s.round(4), atol=2e-4)
        # (per-example forwards against batched ones: fp32 NLLs ~1e-7 apart, the scales set by their differences)
        np.testing.assert_allclose(r.domains[d].G, want.G, rtol=5e-4, atol=1e-6)
        assert P.quadratic_loss(r.domains[d], np.zeros(M)) == pytest.approx(full_c[j], rel=1e-6)  # k = M
    # its cost: every pass, in positions (padding included) over those of one merge's evaluation in
    # the sweep (each domain batched apart); a backward counted as 2
    from mergelaws.data import MAX_WASTE, length_batches

    def pos(examples, waste=MAX_WASTE):
        return sum(max(len(e) for e in b) * len(b) for b in length_batches(examples, 32, waste)) if examples else 0

    sweep = sum(pos(ex) for ex in inp.evalsets.values())
    tk = pos([e for ex in sub_k.values() for e in ex]) / sweep
    tg = sum(pos(ex) for ex in sub_g.values()) / sweep  # the gradient: one domain at a time
    rest = pos([e for ex in complement(inp.evalsets, sub_g).values() for e in ex]) / sweep
    assert r.forward_equivalents == pytest.approx(3 * tg + rest + (M + (fk > fg)) * tk)
    assert r.sample["position_fraction"] == pytest.approx(tk, abs=1e-4)
    items = r.sample["seconds_by_item"]
    assert set(items) == {"gradient_and_gram", "center_loss_rest", "single_expert_losses", "draw"}
    assert r.seconds == pytest.approx(sum(items.values()), abs=2e-3)


def test_gradient_at_gives_the_loss_of_a_part_of_its_examples(tiny):
    from mergelaws.theory.quantities import subsample

    model, base, vectors, _ = tiny
    sets = _evalsets({"one": 8, "two": 8}, seed=2)
    part = subsample(sets, 0.25, seed=1)
    beta = np.full(3, 1 / 3)
    x = gradient_at(model, base, vectors, sets, pad_id=0, beta0=beta, batch_tokens=32, part=part)
    want = losses_at(model, base, vectors, [beta], part, pad_id=0, batch_tokens=32)[0]
    np.testing.assert_allclose([x.part_losses[d] for d in sets], want, rtol=1e-6)
    full = losses_at(model, base, vectors, [beta], sets, pad_id=0, batch_tokens=32)[0]
    np.testing.assert_allclose([x.domains[d].loss for d in sets], full, rtol=1e-6)
    assert gradient_at(model, base, vectors, sets, pad_id=0, beta0=beta).part_losses == {}


def test_sweep_cost_sums_the_shards_and_the_enumeration_fraction(tmp_path):
    from mergelaws.theory import score as S
    from mergelaws.theory.run import sweep_cost, sweep_seconds

    d = tmp_path / "xs" / "average"
    d.mkdir(parents=True)
    loaded = "sweep xs/average: 1,000 params, 3 experts, 37 subsets x 3 eval domains; loaded in {}s\n"
    (d / "1of2.log").write_text(loaded.format(2.0) + "sweep xs/average: 37 merges evaluated (37 in the table) "
                                                      "in 10.0s -> x\n")
    (d / "2of2.log").write_text(loaded.format(9.0) + "sweep xs/average: 30 merges evaluated (30 in the table) in "
                                "4.0s -> x\n" + loaded.format(1.5) + "sweep xs/average: 37 merges evaluated (37 in "
                                "the table) in 12.5s -> x\n")  # resumed: the last lines count
    assert sweep_cost(tmp_path, "xs", "average") == (22.5, 74, 3.5)
    assert sweep_seconds(tmp_path, "xs", "average") == 22.5
    assert sweep_cost(tmp_path, "xs", "ties") == (None, None, None)
    # scores: the measured sweep's fraction first, the full enumeration's (2^M - 1 subsets) second
    M, experts = 3, ["e0", "e1", "e2"]
    rows, meas = [], []
    subsets = [()] + [s for k in range(1, M + 1) for s in itertools.combinations(experts, k)]
    for i, s in enumerate(subsets):
        for dom in ("x", "y"):
            val = 3.0 - 0.1 * len(s) + 0.01 * i + (0.02 if dom == "y" else 0.0)
            base = {"size": "xs", "params": 1, "method": "average", "k": len(s), "subset": f"s{i}",
                    "members": "+".join(s), "eval_domain": dom, "in_domain": False, "status": "ok"}
            meas.append({**base, "loss": val})
            rows.append({**base, "variant": "sampled", "loss": val + 0.001})
    summary = {"size": "xs", "M": M, "methods": {"average": {"sampled": {
        "seconds": 1.5, "forward_equivalents": 3.0, "theorem": {"L_inf": 2.7, "A": 0.1}}}}}
    (sc,) = S.score(pd.DataFrame(rows), pd.DataFrame(meas), summary, {"average": 22.5}, {"average": 74},
                    {"average": 3.5})
    assert sc.compute_fraction == pytest.approx(1.5 / 22.5)
    assert sc.compute_fraction_no_load == pytest.approx(1.5 / 19.0)
    assert sc.forward_fraction == pytest.approx(3.0 / 74)
    assert sc.enumeration_subsets == 7
    assert sc.compute_fraction_enumeration == pytest.approx(1.5 / (22.5 / 74 * 7))
    assert sc.spearman == pytest.approx(1.0)


def test_one_macro():
    from mergelaws.theory import quantities as Q
    from mergelaws.theory import run as R

    assert R.macro is Q.macro
    qs = {d: DomainQuantities(d, n, L, np.full(2, a), np.eye(2) * a) for d, n, L, a in (("x", 3, 1.0, 1.0),
                                                                                        ("y", 5, 2.0, 3.0))}
    m = Q.Expansion("center", ["e0", "e1"], np.zeros(2), qs).macro()
    assert (m.tokens, m.loss) == (8, 1.5)
    np.testing.assert_allclose(m.a, [2.0, 2.0])
    np.testing.assert_allclose(m.G, 2 * np.eye(2))


@pytest.mark.parametrize("kw, needle", [({"eval_fraction": 0.0}, "theory.eval_fraction"),
                                        ({"gradient_fraction": 2.0}, "theory.gradient_fraction"),
                                        ({"seed": -1}, "theory.sample_seed"),
                                        ({"backward_dtype": "float16"}, "theory.backward_dtype")])
def test_sample_settings_refuse_bad_values_in_one_line(kw, needle):
    from mergelaws.errors import ConfigError
    from mergelaws.theory.run import sample_settings

    with pytest.raises(ConfigError, match=needle) as exc:
        sample_settings({"theory": {}}, **kw)
    assert "\n" not in str(exc.value)


def test_blocked_dot_and_weight_gram_match_float64():
    from mergelaws.theory.quantities import (
        blocked_dot,
        blocked_matmul,
        stack_vectors,
        stacked,
        weight_gram,
    )

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3 * 16384 + 77, generator=g), torch.randn(3 * 16384 + 77, generator=g) * 1e-3
    scale = float(x.norm() * y.norm())  # fp32 products: error ~1e-7 of |x||y|, whatever the cancellation
    assert abs(blocked_dot(x, y) - float(x.double() @ y.double())) < 1e-6 * scale
    assert blocked_dot(x[:50], y[:50]) == pytest.approx(float(x[:50].double() @ y[:50].double()), rel=1e-12)
    vecs = [{"a": torch.randn(40000, generator=g), "b": torch.randn(7, 9, generator=g)} for _ in range(3)]
    flat = torch.stack([torch.cat([v["a"], v["b"].reshape(-1)]) for v in vecs]).double()
    want = (flat @ flat.T).numpy()
    tol = {"rtol": 1e-6, "atol": 1e-6 * float(flat.norm(dim=1).max() ** 2)}
    np.testing.assert_allclose(weight_gram(vecs), want, **tol)
    # stacked in place (one (M, ...) tensor per name): the same vectors, the same Gram by one matmul per name
    before = [{n: t.clone() for n, t in v.items()} for v in vecs]
    assert stacked(vecs, "a") is None
    stack_vectors(vecs)
    for v, w in zip(vecs, before):
        for n in v:
            assert torch.equal(v[n], w[n])
    assert stacked(vecs, "a").shape == (3, 40000) and stacked(vecs, "b").shape == (3, 63)
    np.testing.assert_allclose(weight_gram(vecs), want, **tol)
    ys = torch.randn(2, 40000, generator=g)
    np.testing.assert_allclose(blocked_matmul(stacked(vecs, "a"), ys),
                               (flat[:, :40000] @ ys.double().T).numpy(), rtol=1e-6, atol=1e-6 * 40000)
    # a row that is not its stack's row i is not taken for one
    vecs[0]["a"], vecs[1]["a"] = vecs[1]["a"], vecs[0]["a"]
    assert stacked(vecs, "a") is None


def test_length_batches_keep_padding_within_the_waste_limit():
    from mergelaws.data import IGNORE, Example, length_batches

    lens = [5, 6, 6, 7, 20, 22, 60, 61, 200]
    ex = [Example(list(range(n)), [IGNORE] + list(range(1, n))) for n in lens]
    one = length_batches(ex, 10_000)
    assert len(one) == 1  # no limit: one batch, padded to 200 (1,800 positions for 387 tokens)
    cut = length_batches(ex, 10_000, 0.1)
    assert sorted(len(e) for b in cut for e in b) == lens
    for b in cut:
        assert max(len(e) for e in b) * len(b) <= 1.1 * sum(len(e) for e in b)
    assert [[len(e) for e in b] for b in cut] == [[5, 6, 6], [7], [20, 22], [60, 61], [200]]


def test_bf16_backward_keeps_every_loss_and_rounds_only_the_gradient(tiny):
    """The sampled variant's bf16 backward: the forward is untouched (losses bit for bit), g^T v_i
    carries bf16 rounding only, and the model's layers are themselves again afterwards."""
    from mergelaws.theory.quantities import subsample

    model, base, vectors, _ = tiny
    sets = _evalsets({"one": 8, "two": 8}, seed=3)
    part = subsample(sets, 0.25, seed=2)
    beta = np.full(3, 1 / 3)
    kw = {"pad_id": 0, "beta0": beta, "batch_tokens": 32, "part": part}
    x32 = gradient_at(model, base, vectors, sets, **kw)
    x16 = gradient_at(model, base, vectors, sets, backward_dtype="bfloat16", **kw)
    assert x16.part_losses == x32.part_losses
    for d in sets:
        assert x16.domains[d].loss == x32.domains[d].loss
        np.testing.assert_array_equal(x16.domains[d].G, x32.domains[d].G)
        a16, a32 = x16.domains[d].a, x32.domains[d].a
        assert not np.array_equal(a16, a32)  # the backward did run in bf16
        np.testing.assert_allclose(a16, a32, rtol=0, atol=2e-2 * np.abs(a32).max())
    assert any("bfloat16" in n for n in x16.notes) and not any("bfloat16" in n for n in x32.notes)
    # split=False: the backward's weights as their bf16 part alone (not the default): another rounding
    hi = gradient_at(model, base, vectors, sets, backward_dtype="bfloat16", split=False, **kw)
    for d in sets:
        assert hi.domains[d].loss == x32.domains[d].loss and not np.array_equal(hi.domains[d].a, x16.domains[d].a)
        np.testing.assert_allclose(hi.domains[d].a, x32.domains[d].a, rtol=0, atol=2e-2 * np.abs(x32.domains[d].a).max())
    assert not any("forward" in vars(m) for m in model.modules())  # the patched forwards are gone
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), base[n], rtol=0, atol=0)
    # a later fp32 gradient is the fp32 one again
    again = gradient_at(model, base, vectors, sets, **kw)
    for d in sets:
        np.testing.assert_array_equal(again.domains[d].a, x32.domains[d].a)


def test_deferred_weight_gradients_match_the_per_batch_ones(tiny):
    """The bf16 backward's weight gradients formed once per domain from the batches' rows (and the
    embedding's as sparse rows) give the same g^T v_i as those formed per batch, to bf16 rounding; a
    budget that flushes at every batch sums the same dL/dW; the embeddings are dense again after."""
    from mergelaws.data import pad_batch
    from mergelaws.theory.quantities import _token_nll, bf16_backward

    model, base, vectors, _ = tiny
    sets = _evalsets({"one": 8, "two": 8}, seed=5)
    kw = {"pad_id": 0, "beta0": np.full(3, 1 / 3), "batch_tokens": 24, "backward_dtype": "bfloat16"}
    per = gradient_at(model, base, vectors, sets, deferred=False, **kw)
    once = gradient_at(model, base, vectors, sets, **kw)
    x32 = gradient_at(model, base, vectors, sets, **{**kw, "backward_dtype": "float32"})
    for d in sets:
        assert once.domains[d].loss == per.domains[d].loss == x32.domains[d].loss
        a32 = x32.domains[d].a
        assert not np.array_equal(once.domains[d].a, per.domains[d].a)  # another summation
        for x in (once, per):
            np.testing.assert_allclose(x.domains[d].a, a32, rtol=0, atol=2e-2 * np.abs(a32).max())
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))

    # dL/dW: flushed at every batch or once, against the fp32 backward's .grad
    batches = [pad_batch(sets["one"][i:i + 2], 0) for i in range(0, 8, 2)]
    live = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    for ids, att, lab in batches:
        _token_nll(model, ids, att, lab, lab[:, 1:] != -100).sum().backward()
    ref = {n: p.grad.clone() for n, p in live.items() if p.grad is not None}
    sums = []
    for budget in (1, 1 << 30):
        model.zero_grad(set_to_none=True)
        with bf16_backward(model, defer=True) as low:
            low.deferred.budget = budget
            for ids, att, lab in batches:
                _token_nll(model, ids, att, lab, lab[:, 1:] != -100).sum().backward()
            sums.append(low.deferred.take())
            emb = model.get_input_embeddings().weight.grad
            assert emb.is_sparse  # only the batches' token rows
    model.zero_grad(set_to_none=True)
    linear = {n for n, p in live.items() if any(m.weight is p for m in model.modules()
                                                  if isinstance(m, torch.nn.Linear))}
    assert set(sums[0]) == set(sums[1]) == linear
    for n in linear:
        tied = n == "model.embed_tokens.weight"  # the LM head's part only; the embedding's is sparse
        want = ref[n] - emb.to_dense() if tied else ref[n]
        for got in sums:
            torch.testing.assert_close(got[n], want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_set_point_writes_point_params_bits_in_place(tiny):
    from mergelaws.theory.quantities import set_point

    model, base, vectors, _ = tiny
    live = dict(model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in live.items()}
    for beta in (np.eye(3)[1], np.array([0.2, -0.7, 1 / 3])):
        set_point(live, base, vectors, beta)
        want = point_params(base, vectors, beta)
        for n in base:
            assert torch.equal(live[n].detach(), want[n]) and live[n].data_ptr() == ptrs[n]
    set_point(live, base, vectors, np.zeros(3))
    for n in base:
        assert torch.equal(live[n].detach(), base[n])


def test_backward_dtype_auto_follows_the_hardware_and_the_model_size(tiny, monkeypatch):
    from mergelaws.theory.quantities import (
        BF16_BACKWARD_MIN_PARAMS,
        resolve_backward_dtype,
    )
    from mergelaws.theory.run import compute_variants, sample_settings

    big = BF16_BACKWARD_MIN_PARAMS
    assert resolve_backward_dtype("float32", n_params=big) == "float32"
    assert resolve_backward_dtype("bfloat16", n_params=10) == "bfloat16"
    assert sample_settings({"theory": {}})["backward_dtype"] == "auto"
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        assert resolve_backward_dtype("auto", "cpu", big) == ("bfloat16" if amx or avx else "float32")
        assert resolve_backward_dtype("auto", "cpu", big - 1) == "float32"
    # what compute_variants resolves is what it records
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    cfg, inp = _tiny_inputs(tiny)
    for n_params, want in ((10, "float32"), (big, "bfloat16")):
        inp.n_params = n_params
        (r,) = compute_variants(cfg, inp, ["average"], ["sampled"], log=lambda *_: None,
                                sample=sample_settings(cfg, eval_fraction=0.5, gradient_fraction=0.5))
        assert r.sample["backward_dtype"] == want


def test_gradient_at_reads_stacked_task_vectors_the_same(tiny):
    from mergelaws.theory.quantities import stack_vectors, stacked

    model, base, vectors, _ = tiny
    sets = _evalsets({"one": 6, "two": 6}, seed=4)
    beta = np.full(3, 1 / 3)
    x = gradient_at(model, base, vectors, sets, pad_id=0, beta0=beta, batch_tokens=32)
    copies = [dict(v) for v in vectors]
    stack_vectors(copies)
    assert all(stacked(copies, n) is not None for n in base)
    y = gradient_at(model, base, copies, sets, pad_id=0, beta0=beta, batch_tokens=32)
    for d in sets:
        assert y.domains[d].loss == x.domains[d].loss
        np.testing.assert_allclose(y.domains[d].a, x.domains[d].a, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(y.domains[d].G, x.domains[d].G, rtol=1e-6, atol=1e-9)
