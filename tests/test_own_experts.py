"""Your own experts (bases.<size>.experts): existing fine-tunes used instead of training.

A tiny base (the shipped data/bases/xs) and experts built from it in a temp dir: Snakemake plans
train jobs only for the domains not listed; an expert whose vocabulary grew merges with its extra
embedding rows cut (checked against a direct reference); experts of another architecture, other
shapes or untied embeddings are refused by `mergelaws sweep` with a one-line error; config errors
name the key and the fix.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
XS = ROOT / "data" / "bases" / "xs"
DD = ROOT / "data" / "domains"
EXTRA_ROWS = 3


def _domains(names):
    return {n: {"train": str(DD / n / "train.jsonl.gz"), "eval": str(DD / n / "eval.jsonl.gz")} for n in names}


def _perturbed(seed: int, scale: float = 0.01):
    """The xs base with seeded noise on every weight: a stand-in for a fine-tune."""
    from mergelaws import models

    m = models.load_model(XS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in models.float_state(m).values():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Experts of xs in a temp dir: two ordinary ones, one whose vocabulary grew by EXTRA_ROWS
    tokens (resize_token_embeddings on a copy), and three that are not fine-tunes of xs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergelaws import models

    work = tmp_path_factory.mktemp("own")
    tok = models.load_tokenizer(XS)
    out = {}
    for j, name in enumerate(["code", "quotes"]):
        models.save_model(_perturbed(300 + j), work / name, tokenizer_from=XS)
        out[name] = work / name
    grown = _perturbed(310)
    tok2 = models.load_tokenizer(XS)
    tok2.add_special_tokens({"additional_special_tokens": [f"<|extra{i}|>" for i in range(EXTRA_ROWS)]})
    grown.resize_token_embeddings(len(tok2))
    with torch.no_grad():  # the new rows: something to cut (not the resize's mean initialisation)
        grown.get_input_embeddings().weight[-EXTRA_ROWS:].normal_(generator=torch.Generator().manual_seed(5))
    models.save_model(grown, work / "grown", tokenizer=tok2)
    out["grown"] = work / "grown"
    # another architecture with the same sizes (Qwen2: same tensor names plus attention biases)
    spec = {"arch": "qwen2", "hidden_size": 48, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
    models.save_model(models.init_model(models.tiny_config(spec, tok), 1), work / "qwen2", tokenizer_from=XS)
    out["qwen2"] = work / "qwen2"
    # the same architecture with other shapes (a narrower MLP)
    spec = dict(spec, arch="llama", intermediate_size=64)
    models.save_model(models.init_model(models.tiny_config(spec, tok), 2), work / "narrow", tokenizer_from=XS)
    out["narrow"] = work / "narrow"
    # untied embeddings (a separate lm_head)
    cfg = AutoConfig.from_pretrained(str(XS))
    cfg.tie_word_embeddings = False
    torch.manual_seed(3)
    untied = AutoModelForCausalLM.from_config(cfg)
    untied.load_state_dict(models.load_model(XS).state_dict(), strict=False)
    models.save_model(untied, work / "untied", tokenizer_from=XS)
    out["untied"] = work / "untied"
    return work, out


def _config(work: Path, experts: dict, domains=("code", "quotes"), **extra) -> dict:
    raw = {
        "results": str(work / "results"),
        "domains": _domains(domains),
        "bases": {"xs": {"model": str(XS), "experts": {d: str(p) for d, p in experts.items()}}},
        "train": {"steps": 2, "batch_size": 2, "max_len": 32, "device": "cpu"},
        "methods": {"average": {}, "dare": {"drop_rate": 0.3}},
        "sweep": {"k": "all", "subsets_per_k": 3, "device": "cpu"},
        "eval": {"max_examples": 4, "max_len": 48},
    }
    raw.update(extra)
    return raw


# ---- planning: listed domains get no train job ---------------------------------------------------

def _plan(tmp_path: Path, raw: dict) -> tuple[dict[str, int], str]:
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(path), "--cores", "1", "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts, out


def test_listed_domains_plan_no_training(pool, tmp_path):
    work, ex = pool
    raw = _config(tmp_path, {"code": ex["code"], "quotes": ex["grown"]}, domains=("code", "quotes", "algebra"))
    # a second size whose own expert is a hub id: planned without touching the network
    raw["bases"]["s"] = {"model": str(ROOT / "data" / "bases" / "s"), "experts": {"quotes": "example-org/s-quotes"}}
    counts, out = _plan(tmp_path, raw)
    trained = sorted(set(re.findall(r"experts/(\w+)/(\w+)/config\.json", out)))
    assert counts.get("train") == 3, out[-3000:]  # xs: algebra; s: code and algebra
    assert trained == [("s", "algebra"), ("s", "code"), ("xs", "algebra")]
    assert counts.get("sweep") == 4  # 2 sizes x 2 methods
    assert "example-org" not in out  # the hub id is no file input: nothing waits for it

    raw = _config(tmp_path, {"code": ex["code"], "quotes": ex["quotes"]})
    counts, out = _plan(tmp_path, raw)
    assert counts.get("train") is None and counts.get("sweep") == 2, out[-3000:]


def test_llama32_pool_config_plans_no_training(tmp_path):
    """config/llama32-3b.yaml: every expert a hub id, so the plan has sweeps and no train job
    (and touches neither the hub's models nor its datasets while planning)."""
    raw = yaml.safe_load((ROOT / "config" / "llama32-3b.yaml").read_text())
    experts = raw["bases"]["3B"]["experts"]
    assert set(experts) == set(raw["domains"]) and len(experts) == 8
    counts, out = _plan(tmp_path, raw)
    assert counts.get("train") is None and counts.get("pretrain") is None, out[-3000:]
    assert counts.get("sweep") == 4 * 4  # 4 methods x 4 shards


# ---- config errors: one line naming the key and the fix ------------------------------------------

def _config_error(raw) -> str:
    from mergelaws import config

    with pytest.raises(config.ConfigError) as exc:
        config.validate(copy.deepcopy(raw))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_domain_is_a_config_error(pool, tmp_path):
    work, ex = pool
    msg = _config_error(_config(tmp_path, {"code": ex["code"], "poetry": ex["quotes"]}))
    assert msg.startswith("bases.xs.experts.poetry: 'poetry' is not one of the domains (code, quotes)")
    assert "add it under `domains:`" in msg


def test_missing_path_is_a_config_error(pool, tmp_path):
    work, ex = pool
    msg = _config_error(_config(tmp_path, {"code": "./no/such/expert"}))
    assert msg.startswith("bases.xs.experts.code = './no/such/expert' does not exist")
    assert _config_error(_config(tmp_path, {"code": str(tmp_path)})).startswith(
        f"bases.xs.experts.code = '{tmp_path}' has no config.json")
    trained_here = tmp_path / "results" / "experts" / "xs" / "code"
    trained_here.mkdir(parents=True)
    (trained_here / "config.json").write_text("{}")
    assert "is where rule train writes this expert" in _config_error(_config(tmp_path, {"code": trained_here}))
    # 'org/name' with no such directory is a hub id: not checked at validation
    from mergelaws import config, grid

    cfg = config.validate(_config(tmp_path, {"code": "some-org/some-model"}))
    assert grid.expert_dir(cfg, "xs", "code") == "some-org/some-model"
    assert grid.expert_input(cfg, "xs", "code") == []
    assert grid.expert_dir(cfg, "xs", "quotes") == str(tmp_path / "results" / "experts" / "xs" / "quotes")


# ---- a grown vocabulary: the extra rows are cut ---------------------------------------------------

def _reference(method, params, members, subset_id, seed, cut=True):
    from safetensors.torch import load_file

    from mergelaws import merging as M
    from mergelaws import models

    base = {n: p.detach().float().clone() for n, p in models.float_state(models.load_model(XS)).items()}
    experts = []
    for path in members:
        stored = load_file(Path(path) / "model.safetensors")
        experts.append({n: (stored[n][: b.shape[0]] if cut else stored[n]).float() for n, b in base.items()})
    return M.merge_state_dicts(method, base, experts, params, seed=seed, subset_id=subset_id)


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("method", ["average", "dare"])
def test_grown_vocabulary_is_cut_and_merges_as_the_cut_experts(pool, tmp_path, mode, method):
    from mergelaws import config, grid, models
    from mergelaws.sweep import build_merger

    work, ex = pool
    raw = _config(tmp_path, {"code": ex["grown"], "quotes": ex["quotes"]})
    raw["sweep"]["max_memory_gb"] = None if mode == "memory" else 1e-6
    cfg = config.validate(raw)
    model = models.load_model(XS)
    live = models.float_state(model)
    dirs = {d: grid.expert_dir(cfg, "xs", d) for d in ("code", "quotes")}
    assert dirs["code"] == str(ex["grown"])
    logs = []
    merger = build_merger(cfg, method, cfg["methods"][method], model, live, str(XS), dirs, ["code", "quotes"],
                          "cpu", "xs/test", logs.append)
    assert merger.mode == mode
    cut_lines = [ln for ln in logs if "rows cut" in ln]
    assert len(cut_lines) == 1 and str(ex["grown"]) in cut_lines[0]
    assert f"{EXTRA_ROWS} rows cut from model.embed_tokens.weight (2051 -> 2048 rows)" in cut_lines[0]
    for members in (["code"], ["code", "quotes"]):
        got = merger.merge(members, "sid")
        ref = _reference(method, cfg["methods"][method], [dirs[m] for m in members], "sid", cfg["seed"])
        for n in ref:
            assert got[n].shape == live[n].shape
            if method == "dare":  # direct path: bit for bit
                assert torch.equal(got[n], ref[n]), n
            else:  # running sum: fp32 rounding
                torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="embed_tokens.weight has shape"):  # uncut, it would not merge at all
        _reference(method, cfg["methods"][method], [dirs["code"]], "sid", cfg["seed"], cut=False)


def test_grown_vocabulary_sweeps_end_to_end(pool, tmp_path):
    from mergelaws import config
    from mergelaws.sweep import run_sweep

    work, ex = pool
    cfg = config.validate(_config(tmp_path, {"code": ex["grown"], "quotes": ex["quotes"]}))
    logs = []
    table = run_sweep(cfg, "xs", "average", tmp_path / "avg.parquet", log=logs.append)
    assert table["loss"].notna().all() and (table["status"] == "ok").all()
    assert sorted(table["members"].unique()) == ["", "code", "code+quotes", "quotes"]
    assert sum("rows cut" in ln for ln in logs) == 1


def test_strict_check_refuses_a_grown_vocabulary(pool):
    from mergelaws import models

    work, ex = pool
    base, grown = models.load_model(XS), models.load_model(ex["grown"])
    with pytest.raises(models.ModelError, match=r"has shape \(2051, 48\) for model.embed_tokens.weight but the base "
                                                r"has \(2048, 48\)"):
        models.check_compatible(base, grown, ex["grown"])
    assert models.check_compatible(base, grown, ex["grown"], allow_vocab_growth=True) == {
        "model.embed_tokens.weight": EXTRA_ROWS}
    assert models.check_expert_files(base, ex["grown"]) == {"model.embed_tokens.weight": EXTRA_ROWS}


# ---- incompatible experts: `mergelaws sweep` stops with one line, exit code 2 ----------------------

@pytest.mark.parametrize("kind,expected", [
    ("qwen2", r"has model_type = 'qwen2' in its config.json but its base has 'llama'"),
    ("narrow", r"has shape \(64, 48\) for model\.layers\.0\.mlp\.gate_proj\.weight but the base has \(128, 48\)"),
    ("untied", r"has tie_word_embeddings = False in its config.json but its base has True"),
])
def test_incompatible_expert_is_refused_by_the_sweep(pool, tmp_path, kind, expected):
    work, ex = pool
    raw = _config(tmp_path, {"code": ex["code"], "quotes": ex[kind]})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "mergelaws.cli", "sweep", "--config", str(path), "--size", "xs",
                           "--method", "average", "--out", str(tmp_path / "x.parquet"), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mergelaws sweep: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    assert f"expert {ex[kind]}" in errors[0]
    assert re.search(expected, errors[0]), errors[0]
    assert not (tmp_path / "x.parquet").exists()
