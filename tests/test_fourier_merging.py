"""fr_merging and free_merging (workflow/mergelaws/merging/fourier.py): against a direct numpy
reference (float64 FFT, loops), the filter's properties (identity on square matrices at ratio 0.9,
high-pass on rectangular ones), the SUM combine, the lightweight expert, the engine's apply/restore
of it, the mergekit front end (free_merging with `mergelaws merge --task`), and a real tiny sweep
where free_merging's cross-domain rows are fr_merging's bit for bit and its in-domain rows are not."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import domain_specs, noise_experts
import torch

from mergelaws import merging as M

ROOT = Path(__file__).resolve().parents[1]
XS = ROOT / "data" / "bases" / "xs"
K = 3
SHAPES = [(24, 64), (64, 24), (6, 40), (16, 16), (9, 9), (7, 15), (48,), (1,), (2, 3, 4)]


def _deltas(shape, k=K, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((k, *shape), generator=g) * 0.01 + offset


# ---------------------------------------------------------------- the reference, written out

def ref_mask(h, w, ratio=0.9, double_ring=True):
    """The released mask, from its definition: distance to (H//2, W//2) on the unshifted grid,
    low-pass d <= min//10 plus band-pass min//10 <= d <= ratio*min (or the plain disk)."""
    i = np.arange(h)[:, None] - h // 2
    j = np.arange(w)[None, :] - w // 2
    d = np.hypot(i, j)
    r0, big_r = min(h, w) // 10, ratio * min(h, w)
    if not double_ring:
        return (d <= big_r).astype(np.float64)
    return (d <= r0).astype(np.float64) + ((d >= r0) & (d <= big_r)).astype(np.float64)


def ref_filter(v, ratio=0.9, double_ring=True):
    if v.ndim != 2:
        return v
    return np.real(np.fft.ifft2(np.fft.fft2(v) * ref_mask(*v.shape, ratio, double_ring)))


def ref_fr(deltas, ratio=0.9, weight=0.8, scale=1.1, normalize=False, double_ring=True):
    s = np.stack([ref_filter(v, ratio, double_ring) for v in deltas])
    u = weight * s
    elected = np.where(u.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(u) == elected  # zeros never agree
    total = (u * agree).sum(0)
    if normalize:
        den = (weight * agree).sum(0)
        total = total / np.where(den == 0, 1.0, den)
    return scale * total


def ref_expert(v, density):
    flat = v.reshape(-1)
    n = flat.size
    n_keep = math.floor(density * n)
    order = np.argsort(np.abs(flat), kind="stable")  # ascending, ties by index
    keep = np.zeros(n, bool)
    keep[order[n - n_keep:]] = True
    return (flat * keep).reshape(v.shape)


def close(out, ref, rtol=1e-5, atol=1e-7):
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- the merge against the reference

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [{}, {"ratio": 0.5, "weight": 1.0, "scale": 1.0},
                                    {"ratio": 0.3, "normalize": True}, {"double_ring": False, "ratio": 0.4}])
def test_fr_merging_matches_reference(shape, params):
    d = _deltas(shape, seed=1)
    out = M.merge_deltas("fr_merging", d, params)
    assert out.dtype == torch.float32 and out.shape == shape
    full = M.resolve_params("fr_merging", params)
    close(out, ref_fr(d.double().numpy(), **full))
    # free_merging merges exactly as fr_merging (its expert is the sweep's, per eval domain)
    assert torch.equal(M.merge_deltas("free_merging", d, params), out)


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (6, 40), (16, 16), (9, 9), (7, 15), (48, 128), (2048, 48)])
@pytest.mark.parametrize("ratio", [0.9, 0.5, 0.05])
def test_mask_is_the_released_definition(shape, ratio):
    for double_ring in (True, False):
        m = M.frequency_mask(shape, ratio, double_ring)
        np.testing.assert_array_equal(m.numpy(), ref_mask(*shape, ratio, double_ring))
    m = M.frequency_mask(shape, ratio)
    h, w = shape
    r0 = min(h, w) // 10
    i, j = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    on_ring = (i * i + j * j == r0 * r0) & (r0 <= ratio * min(h, w))
    assert int((m == 2).sum()) == int(on_ring.sum())  # the doubled ring: frequencies at exactly r0 ...
    assert (int(on_ring.sum()) > 0) == (r0 <= ratio * min(h, w))  # ... when it lies inside the disk


def test_filter_is_the_identity_on_square_matrices_at_ratio_09():
    for n in (9, 16, 48, 96):
        assert M.spectrum_kept((n, n)) == 1.0  # the disk holds the whole grid (corners at n/sqrt(2))
        v = _deltas((n, n), k=1, seed=n)[0]
        assert torch.equal(M.frequency_filter(v, 0.9, double_ring=False), v)  # exactly, no FFT round trip
        one = M.merge_deltas("fr_merging", v[None], {"weight": 1.0, "scale": 1.0, "double_ring": False})
        assert torch.equal(one, v)  # k = 1, w = lambda = 1: the merge is the task vector itself
        # the released mask: the identity plus the doubled ring's frequencies once more
        ring = (M.frequency_mask((n, n)) == 2).double().numpy()
        extra = np.real(np.fft.ifft2(np.fft.fft2(v.double().numpy()) * ring))
        close(M.frequency_filter(v), v.double().numpy() + extra, atol=1e-8)
        assert np.abs(extra).max() > 0


def test_filter_is_high_pass_on_rectangular_matrices():
    for shape in [(6, 40), (48, 128), (128, 48), (2048, 48)]:
        v = _deltas(shape, k=1, seed=3, offset=0.05)[0]  # a large DC component
        f = M.frequency_filter(v)
        assert float(v.mean()) > 0.04
        assert abs(float(f.double().mean())) < 1e-7  # the DC bin F[0, 0] is removed
        assert abs(complex(torch.fft.fft2(f.double())[0, 0])) < 1e-5
        kept = M.spectrum_kept(shape)
        assert 0.0 < kept < 0.7
        # what it removes is the spectrum outside the disk: the filtered vector keeps that energy share
        spec = torch.fft.fft2(v.double() - v.double().mean())
        mask = torch.from_numpy(ref_mask(*shape)).bool()
        expect = float((spec.abs() ** 2)[mask].sum() / (spec.abs() ** 2).sum())
        assert 0.0 < expect < 1.0
    # the tiny bases' matrices: MLP 48x128 loses 36% of its spectrum, the 2048x48 embedding 96%
    assert round(1 - M.spectrum_kept((48, 128)), 2) == 0.36
    assert round(1 - M.spectrum_kept((2048, 48)), 2) == 0.96
    v = _deltas((48,), k=1, seed=4, offset=0.05)[0]
    assert torch.equal(M.frequency_filter(v), v)  # 1-D tensors pass unchanged


def test_combine_is_a_sum_not_a_mean():
    v = _deltas((24, 64), k=1, seed=5)
    p = {"weight": 1.0, "scale": 1.0}
    one = M.merge_deltas("fr_merging", v, p)
    two = M.merge_deltas("fr_merging", torch.cat([v, v]), p)
    assert torch.equal(two, one + one)  # sum of two agreeing copies
    assert torch.equal(M.merge_deltas("fr_merging", torch.cat([v, v]), {**p, "normalize": True}), one)
    # defaults: lambda * w * sum = 1.1 * 0.8 * (v~ + v~)
    close(M.merge_deltas("fr_merging", torch.cat([v, v]), {}), 1.1 * 0.8 * 2 * one.double().numpy())


def test_zero_entries_do_not_agree_and_zero_sum_elects_plus():
    d = torch.tensor([[0.0, 1.0, 1.0], [2.0, 1.0, -1.0]])  # 1-D: no filter
    out = M.merge_deltas("fr_merging", d, {"weight": 1.0, "scale": 1.0, "normalize": True})
    # entry 0: only the 2 agrees (the 0 is not counted); entry 2: sum 0 -> +1, only the +1 kept
    assert out.tolist() == [2.0, 1.0, 1.0]
    out = M.merge_deltas("fr_merging", d, {"weight": 1.0, "scale": 1.0})
    assert out.tolist() == [2.0, 2.0, 1.0]


def test_deterministic():
    d = _deltas((48, 128), k=4, seed=6)
    a = M.merge_deltas("fr_merging", d, {})
    b = M.merge_deltas("fr_merging", d.clone(), {})
    assert torch.equal(a, b)
    # a model's filtered vector does not depend on the other models (filtered one at a time)
    assert torch.equal(M.merge_deltas("fr_merging", d[:1], {"weight": 1.0, "scale": 1.0}),
                       M.frequency_filter(d[0]))


def test_registry_params_and_bad_values():
    assert M.resolve_params("fr_merging", {}) == {"ratio": 0.9, "weight": 0.8, "scale": 1.1, "normalize": False,
                                                  "double_ring": True}
    assert M.resolve_params("free_merging", {})["expert_density"] == 0.01
    assert M.get_method("free_merging").task_aware and not M.get_method("fr_merging").task_aware
    assert not M.get_method("ties").task_aware
    assert not M.get_method("fr_merging").stochastic
    with pytest.raises(ValueError, match=r"fr_merging.ratio = 0 is out of range; allowed: 0 < ratio"):
        M.resolve_params("fr_merging", {"ratio": 0})
    with pytest.raises(ValueError, match=r"free_merging.expert_density = 1.5 is out of range"):
        M.resolve_params("free_merging", {"expert_density": 1.5})


def test_config_accepts_the_methods_and_names_bad_keys(default_cfg_raw, tmp_path, monkeypatch, capsys):
    import yaml

    from mergelaws import cli, config

    monkeypatch.chdir(ROOT)
    raw = copy.deepcopy(default_cfg_raw)
    raw["methods"] = {"fr_merging": {"ratio": 0.8}, "free_merging": {}}
    cfg = config.validate(raw)
    assert cfg["methods"]["fr_merging"]["ratio"] == 0.8 and cfg["methods"]["free_merging"]["scale"] == 1.1
    bad = copy.deepcopy(default_cfg_raw)
    bad["methods"] = {"free_merging": {"expert_density": 0}}
    with pytest.raises(config.ConfigError, match="expert_density"):
        config.validate(bad)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert cli.main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "methods.free_merging" in err and "expert_density" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_the_shipped_fourier_config_is_valid(monkeypatch):
    from mergelaws import config, grid

    monkeypatch.chdir(ROOT)
    cfg = config.load(ROOT / "config" / "fourier.yaml")
    assert grid.methods(cfg) == ["average", "ties", "fr_merging", "free_merging"]
    assert grid.results_dir(cfg) != "results"


# ---------------------------------------------------------------- the lightweight expert

@pytest.mark.parametrize("shape,density", [((24, 64), 0.01), ((2048, 48), 0.01), ((48,), 0.01), ((300,), 0.01),
                                           ((16, 16), 0.2), ((7, 15), 1.0)])
def test_free_expert_matches_reference(shape, density):
    v = _deltas(shape, k=1, seed=7)[0]
    e = M.free_expert(v, expert_density=density)
    np.testing.assert_array_equal(e.numpy(), ref_expert(v.numpy(), density))
    assert int((e != 0).sum()) == math.floor(density * v.numel())


def test_free_expert_ties_keep_the_latest_indices():
    v = torch.tensor([0.5, -1.0, 1.0, 0.2, 1.0, 0.0] * 50)  # 300 entries, |v| = 1 tied 100 times
    e = M.free_expert(v, expert_density=0.01)  # floor(3) entries
    assert torch.nonzero(e).reshape(-1).tolist() == [295, 296, 298]  # the last three of the tie


# ---------------------------------------------------------------- the engine: apply and restore

def _state(path=XS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {n: t.float() for n, t in load_file(Path(path) / "model.safetensors").items()}


def _perturb(base, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_engine_applies_and_restores_the_task_expert(mode):
    base = _state()
    experts = {f"e{j}": _perturb(base, 100 + j, 0.003 * (j + 1)) for j in range(3)}
    merger = {}
    for method in ("fr_merging", "free_merging"):
        src = M.SafetensorsSource(XS) if mode == "stream" else base
        mg = M.SubsetMerger(method, {}, src, seed=5, mode=mode, names=list(base))
        for key, e in experts.items():
            mg.add_expert(key, e)
        merger[method] = mg
    assert merger["free_merging"].task_aware and not merger["fr_merging"].task_aware
    for members in (["e0"], ["e0", "e2"], ["e0", "e1", "e2"], []):
        live = {n: torch.empty_like(t) for n, t in base.items()}
        ref = merger["fr_merging"].merge(members, "id")
        merger["free_merging"].merge(members, "id", out=live)
        assert all(torch.equal(live[n], ref[n]) for n in base)  # the merge itself is FR-Merging's
        direct = M.merge_state_dicts("fr_merging", base, [experts[m] for m in members], {}) if members else base
        assert all(torch.equal(live[n], direct[n]) for n in base)
        before = {n: t.clone() for n, t in live.items()}
        for key in experts:
            with merger["free_merging"].task_expert(key, live) as applied:
                assert applied == (key in members)
                changed = sum(int((live[n] != before[n]).sum()) for n in base)
                if key in members:
                    for n in base:  # exactly (theta_0 + merge) + e_key where e_key is nonzero
                        e = M.free_expert(experts[key][n] - base[n], expert_density=0.01)
                        want = torch.where(e != 0, before[n] + e, before[n])
                        assert torch.equal(live[n], want), n
                    assert changed > 0
                else:
                    assert changed == 0
            assert all(torch.equal(live[n], before[n]) for n in base)  # restored bit for bit
    # restored after an exception too
    live = merger["free_merging"].merge(["e1"], "id")
    before = {n: t.clone() for n, t in live.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with merger["free_merging"].task_expert("e1", live):
            raise RuntimeError("boom")
    assert all(torch.equal(live[n], before[n]) for n in base)


# ---------------------------------------------------------------- mergelaws merge and the sweep

DOMS = ["code", "quotes", "algebra"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mergelaws import config

    work = tmp_path_factory.mktemp("fourier")
    dirs = noise_experts(work, DOMS, 300, 0.01)
    raw = {
        "results": str(work / "results"),
        "domains": domain_specs(DOMS),
        "bases": {"xs": {"model": str(XS)}},
        "methods": {"fr_merging": {}, "free_merging": {}},
        "sweep": {"k": "all", "subsets_per_k": 3, "chunk": 3, "device": "cpu"},
        "eval": {"max_examples": 6, "max_len": 64},
    }
    return work, config.validate(raw), dirs


def test_mergelaws_merge_fourier_yaml_is_fr_merging(setup, tmp_path):
    import yaml

    from mergelaws import models
    from mergelaws.merging import mergekit as MY

    _, _, dirs = setup
    cfg = {"merge_method": "fourier", "base_model": str(XS), "dtype": "float32",
           "models": [{"model": dirs[d], "parameters": {"weight": 0.8}} for d in DOMS],
           "parameters": {"lambda": 1.1}}
    path = tmp_path / "fr.yml"
    path.write_text(yaml.safe_dump(cfg))
    MY.run_merge(path, tmp_path / "out", log=lambda *_: None)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")
    base = _state()
    ref = M.merge_state_dicts("fr_merging", base, [_state(dirs[d]) for d in DOMS], {})
    assert set(ref) <= set(got)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    assert MY.parse_config(dict(cfg, merge_method="fr_merging")).method == "fr_merging"
    assert models.load_model(tmp_path / "out") is not None


def _merge_yaml(tmp_path, method, dirs):
    import yaml

    cfg = {"merge_method": method, "base_model": str(XS), "dtype": "float32",
           "models": [{"model": dirs[d], "parameters": {"weight": 0.8}} for d in DOMS],
           "parameters": {"lambda": 1.1}}
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_mergelaws_merge_free_merging_adds_the_task_expert(setup, tmp_path, capsys):
    """`mergelaws merge` with merge_method free_merging and --task DOMAIN: the checkpoint is the
    fr_merging checkpoint plus exactly DOMAIN's top-1% lightweight expert, tensor by tensor."""
    from safetensors.torch import load_file

    from mergelaws import cli

    _, _, dirs = setup
    fr_out, free_out = tmp_path / "fr", tmp_path / "free"
    assert cli.main(["merge", str(_merge_yaml(tmp_path, "fr_merging", dirs)), str(fr_out)]) == 0
    assert cli.main(["merge", str(_merge_yaml(tmp_path, "free_merging", dirs)), str(free_out),
                     "--task", "quotes"]) == 0
    fr, free = load_file(fr_out / "model.safetensors"), load_file(free_out / "model.safetensors")
    base, expert = _state(), _state(dirs["quotes"])
    assert set(fr) == set(free)
    changed = 0
    for n in fr:
        e = M.free_expert(expert[n] - base[n], expert_density=0.01)
        assert torch.equal(free[n], torch.where(e != 0, fr[n] + e, fr[n])), n
        assert torch.equal(free[n] != fr[n], e != 0), n  # changed exactly at the expert's entries
        changed += int((e != 0).sum())
    assert changed == sum(math.floor(0.01 * t.numel()) for n, t in fr.items())  # top 1% of every tensor
    import json

    assert json.loads((free_out / "mergelaws_merge.json").read_text())["task_model"] == dirs["quotes"]
    # another domain's expert gives another checkpoint
    other = tmp_path / "free_code"
    assert cli.main(["merge", str(_merge_yaml(tmp_path, "free_merging", dirs)), str(other), "--task", "code"]) == 0
    assert not torch.equal(load_file(other / "model.safetensors")["model.embed_tokens.weight"],
                           free["model.embed_tokens.weight"])
    capsys.readouterr()


@pytest.mark.parametrize("method,args,needles", [
    ("free_merging", [], ["pass --task DOMAIN (one of code, quotes, algebra)", "fr_merging"]),
    ("free_merging", ["--task", "poetry"], ["--task 'poetry' is not the domain of a merged model",
                                            "one of code, quotes, algebra"]),
    ("fr_merging", ["--task", "code"], ["--task is only for task-aware methods", "drop --task"]),
])
def test_mergelaws_merge_task_errors_are_one_line(setup, tmp_path, capsys, method, args, needles):
    from mergelaws import cli

    _, _, dirs = setup
    out = tmp_path / "out"
    assert cli.main(["merge", str(_merge_yaml(tmp_path, method, dirs)), str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergelaws merge: error: ") and "Traceback" not in err[0], err
    assert all(n in err[0] for n in needles), err
    assert not out.exists()


def test_merge_task_domain_comes_from_the_expert_record(tmp_path):
    from mergelaws import cli
    from mergelaws.merging import mergekit as MY

    (tmp_path / "run7").mkdir()
    (tmp_path / "run7" / "mergelaws_expert.json").write_text('{"domain": "algebra", "size": "xs"}')
    (tmp_path / "code").mkdir()
    assert cli._expert_domain(str(tmp_path / "run7")) == "algebra"  # the train rule's record
    assert cli._expert_domain(str(tmp_path / "code")) == "code"  # else the directory's name
    plan = MY.parse_config({"merge_method": "free_merging", "base_model": str(XS),
                            "models": [{"model": str(tmp_path / "code"), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MY.MergeYamlError, match="give the task"):
        MY.check_task(plan, None)  # the Python API refuses too: it would silently be FR-Merging
    with pytest.raises(MY.MergeYamlError, match="not a model index"):
        MY.check_task(plan, 1)
    MY.check_task(plan, 0)


def test_free_merging_sweep_rows(setup):
    from mergelaws.sweep import run_sweep

    work, cfg, dirs = setup
    tables = {m: run_sweep(copy.deepcopy(cfg), "xs", m, work / f"{m}.parquet", expert_dirs=dirs,
                           log=lambda *_: None) for m in ("fr_merging", "free_merging")}
    fr, free = tables["fr_merging"], tables["free_merging"]
    assert (fr["status"] == "ok").all() and (free["status"] == "ok").all()
    keys = ["subset", "eval_domain", "k", "in_domain", "tokens"]
    pd.testing.assert_frame_equal(fr[keys], free[keys])
    cross = ~fr["in_domain"]
    assert cross.sum() > 0 and fr.loc[cross, "k"].max() >= 2
    assert np.array_equal(fr.loc[cross, "loss"].to_numpy(), free.loc[cross, "loss"].to_numpy())  # bit for bit
    inside = fr["in_domain"]
    assert inside.sum() > 0
    assert (fr.loc[inside, "loss"].to_numpy() != free.loc[inside, "loss"].to_numpy()).all()
    # deterministic: a rerun gives the same table
    again = run_sweep(copy.deepcopy(cfg), "xs", "free_merging", work / "again.parquet", expert_dirs=dirs,
                      log=lambda *_: None)
    pd.testing.assert_frame_equal(again, free)
