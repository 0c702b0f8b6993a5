"""dare_ties, breadcrumbs, della, model_stock and the weighted combine step, against
formulas written out independently here (numpy, loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergelaws import merging as M

K = 4
SHAPES = [(48,), (24, 40), (7, 5, 3), (1,), (2,)]


def _deltas(shape, k=K, seed=0, discrete=False):
    g = torch.Generator().manual_seed(seed)
    if discrete:  # many ties in |v|, and exact zeros
        return torch.randint(-3, 4, (k, *shape), generator=g).float() * 0.01
    return torch.randn((k, *shape), generator=g) * 0.01


def _uniforms(shape, k, seed):
    """The documented random stream: one CPU generator per tensor, torch.rand per model in order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g).numpy().astype(np.float64) for _ in range(k)]


def ref_ties_combine(s: np.ndarray, w=None, normalize=True) -> np.ndarray:
    """mergekit's consensus: u = w s; E = +1 if sum u >= 0 else -1; keep sign(u) == E."""
    k = s.shape[0]
    w = np.ones(k) if w is None else np.asarray(w, dtype=np.float64)
    u = s * w.reshape(-1, *([1] * (s.ndim - 1)))
    E = np.where(u.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(u) == E
    num = (u * agree).sum(0)
    if not normalize:
        return num
    den = (w.reshape(-1, *([1] * (s.ndim - 1))) * agree).sum(0)
    return num / np.where(den == 0, 1.0, den)


def ref_l1(v, masked):
    b, a = np.abs(v).sum(), np.abs(masked).sum()
    return masked if (b < 1e-7 or a < 1e-7) else masked * (b / a)


def close(out: torch.Tensor, ref: np.ndarray, rtol=1e-5, atol=1e-7):
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- dare_ties

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_dare_ties_matches_reference(shape, rescale):
    d = _deltas(shape, seed=1)
    p, seed, scale = 0.3, 1234, 0.7
    out = M.merge_deltas("dare_ties", d, {"drop_rate": p, "rescale": rescale, "scale": scale}, seed=seed)
    v = d.double().numpy()
    s = np.empty_like(v)
    for i, u in enumerate(_uniforms(shape, K, seed)):
        m = v[i] * (u >= p)
        s[i] = m / (1 - p) if rescale == "inverse" else ref_l1(v[i], m) if rescale == "l1" else m
    close(out, scale * ref_ties_combine(s))


def test_dare_ties_uses_dares_masks():
    d = _deltas((30, 20), k=1, seed=2)
    for rescale in ("inverse", "none"):
        a = M.merge_deltas("dare", d, {"drop_rate": 0.4, "rescale": rescale}, seed=9)
        b = M.merge_deltas("dare_ties", d, {"drop_rate": 0.4, "rescale": rescale}, seed=9)
        assert torch.equal(a, b)  # k = 1: TIES of one model is the model


def test_dare_ties_p0_equals_ties_density1():
    d = _deltas((17, 9), seed=3)
    a = M.merge_deltas("dare_ties", d, {"drop_rate": 0.0}, seed=5)
    b = M.merge_deltas("ties", d, {"density": 1.0})
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- breadcrumbs

def ref_breadcrumbs_one(v: np.ndarray, density, gamma) -> np.ndarray:
    flat = v.reshape(-1)
    n = flat.size
    n_keep = math.floor(density * n)
    n_top = min(math.floor(gamma * n), n - n_keep)
    order = np.argsort(np.abs(flat), kind="stable")  # ascending, ties by index
    keep = np.zeros(n, bool)
    keep[order[n - n_top - n_keep: n - n_top]] = True
    return (flat * keep).reshape(v.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.2, 0.0), (0.7, 0.5), (0.99, 0.05)])
@pytest.mark.parametrize("discrete", [False, True])
def test_breadcrumbs_matches_reference(shape, density, gamma, discrete):
    d = _deltas(shape, seed=4, discrete=discrete)
    out = M.merge_deltas("breadcrumbs", d, {"density": density, "gamma": gamma, "scale": 1.5})
    v = d.double().numpy()
    ref = np.stack([ref_breadcrumbs_one(v[i], density, gamma) for i in range(K)]).mean(0) * 1.5
    close(out, ref)


def test_breadcrumbs_counts_per_model():
    d = torch.arange(1, 101, dtype=torch.float32).reshape(1, 100) * torch.tensor([[1.0] * 50 + [-1.0] * 50])
    out = M.merge_deltas("breadcrumbs", d, {"density": 0.3, "gamma": 0.05})
    kept = out.abs()[out != 0].sort().values
    assert kept.tolist() == list(range(66, 96))  # top 5 (96..100) dropped, next 30 kept
    # gamma overlapping density: the outlier drop shrinks so that `density` is still kept
    out = M.merge_deltas("breadcrumbs", d, {"density": 0.98, "gamma": 0.1})
    assert int((out != 0).sum()) == 98 and out.abs().max() == 98


# ---------------------------------------------------------------- della

def ref_della_probs(v: np.ndarray, density, eps) -> np.ndarray:
    rows = v.reshape(1, -1) if v.ndim < 2 else v.reshape(v.shape[0], -1)
    n = rows.shape[1]
    q = np.empty_like(rows)
    for r in range(rows.shape[0]):
        order = np.argsort(np.abs(rows[r]), kind="stable")
        rank = np.empty(n)
        rank[order] = np.arange(1, n + 1)  # 1 = smallest |v|
        rho = (rank - 1) / (n - 1) if n > 1 else np.full(n, 0.5)
        q[r] = density - eps + 2 * eps * rho
    return q.reshape(v.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_della_matches_reference(shape, rescale):
    d = _deltas(shape, seed=6)
    density, eps, seed, scale = 0.6, 0.2, 77, 0.9
    out = M.merge_deltas("della", d, {"density": density, "epsilon": eps, "rescale": rescale, "scale": scale},
                         seed=seed)
    v = d.double().numpy()
    s = np.empty_like(v)
    for i, u in enumerate(_uniforms(shape, K, seed)):
        q = ref_della_probs(v[i], density, eps)
        m = v[i] * (u < q)
        s[i] = m / q if rescale == "inverse" else ref_l1(v[i], m) if rescale == "l1" else m
    close(out, scale * ref_ties_combine(s))


def test_della_keep_probability_by_rank():
    v = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    q = M.della_keep_probs(v[0], 0.5, 0.3)
    assert float(q.min()) == pytest.approx(0.2) and float(q.max()) == pytest.approx(0.8)
    assert q[v[0].abs().argmax()] == q.max() and q[v[0].abs().argmin()] == q.min()
    kept = M.sparsify_della(v, 0.5, 0.3, "none", seed=1)[0] != 0
    big = v[0].abs() > v[0].abs().median()
    assert abs(float(kept[big].float().mean()) - 0.65) < 0.03  # E[q | upper half] = 0.65
    assert abs(float(kept[~big].float().mean()) - 0.35) < 0.03


def test_della_rejects_bad_epsilon_and_density_one_is_ties():
    d = _deltas((10, 10), seed=7)
    with pytest.raises(ValueError, match="della: density - epsilon"):
        M.merge_deltas("della", d, {"density": 0.1, "epsilon": 0.2})
    a = M.merge_deltas("della", d, {"density": 1.0, "epsilon": 0.2}, seed=3)
    torch.testing.assert_close(a, M.merge_deltas("ties", d, {}), rtol=0, atol=0)


# ---------------------------------------------------------------- model_stock

def ref_model_stock(v: np.ndarray, filter_wise=False) -> np.ndarray:
    k = v.shape[0]
    mean = v.mean(0)
    rows = v.reshape(k, v.shape[1], -1) if (filter_wise and v.ndim >= 3) else v.reshape(k, 1, -1)
    t = np.empty(rows.shape[1])
    for r in range(rows.shape[1]):
        if k == 1:
            t[r] = 1.0
            continue
        cs = []
        for i in range(k):
            for j in range(i + 1, k):
                a, b = rows[i, r], rows[j, r]
                cs.append(np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1))
        c = float(np.mean(cs))
        den = 1 + (k - 1) * c
        t[r] = 0.0 if abs(den) < 1e-6 else k * c / den  # singular: keep the base
    if t.size == 1:
        return mean * t[0]
    return mean * t.reshape(-1, *([1] * (mean.ndim - 1)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_model_stock_matches_reference(shape, filter_wise, k):
    g = torch.Generator().manual_seed(8)
    common = torch.randn(shape, generator=g)
    d = (common + torch.randn((k, *shape), generator=g)) * 0.01  # correlated: 0 < cos < 1
    out = M.merge_deltas("model_stock", d, {"filter_wise": filter_wise})
    close(out, ref_model_stock(d.double().numpy(), filter_wise))


def test_model_stock_limits():
    v = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    same = v[:1].repeat(3, 1)  # cos = 1 -> t = 1: the mean
    torch.testing.assert_close(M.merge_deltas("model_stock", same, {}), same[0])
    a, b = torch.zeros(50), torch.zeros(50)
    a[0], b[1] = 1.0, 1.0  # orthogonal: cos = 0 -> t = 0: the base
    assert M.merge_deltas("model_stock", torch.stack([a, b]), {}).abs().max() == 0
    opp = torch.stack([a, -a])  # cos = -1, k = 2: singular -> the base
    assert M.merge_deltas("model_stock", opp, {}).abs().max() == 0


# ---------------------------------------------------------------- weighted combine

@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_combine_deltas_weighted_matches_mergekit_formula(consensus, normalize):
    s = _deltas((13, 11), seed=9, discrete=True)  # zeros and ties in the sums
    w = [0.5, 1.0, 2.0, 0.25]
    out = M.combine_deltas(s, torch.tensor(w), consensus=consensus, normalize=normalize)
    sn = s.double().numpy()
    if consensus:
        ref = ref_ties_combine(sn, w, normalize)
    else:
        ref = (sn * np.array(w).reshape(-1, 1, 1)).sum(0) / (sum(w) if normalize else 1.0)
    close(out, ref)


def test_combine_unweighted_is_ties_disjoint_mean():
    d = _deltas((31, 7), seed=10, discrete=True)
    trimmed = M.trim(d, 0.4, None, None)
    a = M.combine_deltas(trimmed, consensus=True, normalize=True)
    b = M.merge_deltas("ties", d, {"density": 0.4})
    assert torch.equal(a, b)


# ---------------------------------------------------------------- registry

NEW = ["dare_ties", "breadcrumbs", "della", "model_stock"]


def test_new_methods_registered_with_defaults():
    assert M.method_names()[:4] == ["average", "task_arithmetic", "ties", "dare"]
    assert set(NEW) <= set(M.method_names())
    assert M.resolve_params("dare_ties", {}) == {"drop_rate": 0.2, "rescale": "inverse", "scale": 1.0}
    assert M.resolve_params("breadcrumbs", {}) == {"density": 0.9, "gamma": 0.01, "scale": 1.0}
    assert M.resolve_params("della", {}) == {"density": 0.8, "epsilon": 0.1, "rescale": "inverse", "scale": 1.0}
    assert M.resolve_params("model_stock", {}) == {"filter_wise": False}
    assert {m for m in NEW if M.get_method(m).stochastic} == {"dare_ties", "della"}


# (the schema of every method, these included, is checked against resolve_params in test_merge.py)


@pytest.mark.parametrize("method", NEW)
def test_state_dict_merge_seeded_and_order_free(method):
    g = torch.Generator().manual_seed(11)
    base = {"a.weight": torch.randn(16, 8, generator=g), "b.bias": torch.randn(8, generator=g),
            "steps": torch.tensor([3])}
    experts = [{n: (t + 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
                for n, t in base.items()} for _ in range(3)]
    out1 = M.merge_state_dicts(method, base, experts, seed=5, subset_id="s")
    rev = [dict(reversed(list(e.items()))) for e in experts]
    out2 = M.merge_state_dicts(method, dict(reversed(list(base.items()))), rev, seed=5, subset_id="s")
    for n in base:
        assert torch.equal(out1[n], out2[n])
    assert torch.equal(out1["steps"], base["steps"])
    out3 = M.merge_state_dicts(method, base, experts, seed=6, subset_id="s")
    differs = any(not torch.equal(out1[n], out3[n]) for n in ("a.weight", "b.bias"))
    assert differs == M.get_method(method).stochastic
    for n in ("a.weight", "b.bias"):
        ref = M.merge_deltas(method, torch.stack([e[n] - base[n] for e in experts]), {},
                             seed=M.tensor_seed(5, "s", n))
        assert torch.equal(out1[n], base[n] + ref)


def test_bf16_inputs_computed_in_fp32():
    d = _deltas((20, 20), seed=12)
    for m in NEW:
        a = M.merge_deltas(m, d.to(torch.bfloat16), {}, seed=1)
        b = M.merge_deltas(m, d.to(torch.bfloat16).float(), {}, seed=1)
        assert a.dtype == torch.float32 and torch.equal(a, b)
