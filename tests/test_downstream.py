"""Downstream scores through lm-evaluation-harness (mergelaws.downstream; App. K, Fig 10): the
local task builder, `mergelaws downstream` end to end on the xs base with two small experts, the
in-memory lm-eval score equal to lm-eval's score of the same model saved as a checkpoint, the
Fig 10 analogue, and bad config -> one line, exit 2."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from mergelaws import cli, models  # noqa: E402
from mergelaws import downstream as DS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["mergelaws_arithmetic_answer", "mergelaws_dictionary_mc"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_local_task_builder_is_deterministic_and_holds_the_answer(cfg, tmp_path):
    pairs = [("What is 2 + 2?", "Step 1: 2 + 2 = 4.\nAnswer: 4"), ("Cost?", "Step 1: 9 x 2 = 18.\nAnswer: $18"),
             ("Solve", "Step 1: y = -7.\nAnswer: y = -7"), ("no answer", "just text")]
    a = DS.build_docs(pairs, "answer", seed=0)
    assert a == DS.build_docs(pairs, "answer", seed=0) and a != DS.build_docs(pairs, "answer", seed=1)
    assert len(a) == 3  # the pair without an Answer: line is left out
    for (prompt, response), d in zip(pairs, a):
        head, _, last = response.rpartition("\n")
        assert d["question"] == prompt and d["prefix"] == head
        assert len(d["choices"]) == 4 == len(set(d["choices"])) and d["choices"][d["label"]] == "\n" + last
        assert all(c.startswith("\nAnswer:") for c in d["choices"])
    mc = DS.build_docs([(f"q{i}", f"r{i}") for i in range(6)], "mc", seed=3)
    assert all(d["choices"][d["label"]] == f"r{i}" and len(set(d["choices"])) == 4 for i, d in enumerate(mc))
    # from a shipped domain: every arithmetic eval example becomes a question, files deterministic
    p1 = DS.write_local_task(cfg, "mergelaws_arithmetic_answer", tmp_path / "a")
    p2 = DS.write_local_task(cfg, "mergelaws_arithmetic_answer", tmp_path / "b")
    j1, j2 = p1.with_suffix(".jsonl").read_text(), p2.with_suffix(".jsonl").read_text()
    assert j1 == j2 and len(j1.splitlines()) == 200
    spec = yaml.safe_load(p1.read_text())
    assert spec["output_type"] == "multiple_choice" and spec["gen_prefix"] == "{{prefix}}"
    assert DS.parse_local("arc_easy") is None and DS.parse_local("mergelaws_code_mc") == ("code", "mc")


def _save_expert(base, tok, out: Path, seed: int, scale: float) -> str:
    """An 'expert': the xs base moved along a seeded direction (saved as a HF model dir)."""
    m = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A config over the xs base with two experts (arithmetic, dictionary) and the local tasks."""
    d = tmp_path_factory.mktemp("ds")
    base = models.load_model(ROOT / "data/bases/xs")
    tok = models.load_tokenizer(ROOT / "data/bases/xs")
    experts = {dom: _save_expert(base, tok, d / dom, 10 + i, 0.02) for i, dom in enumerate(["arithmetic", "dictionary"])}
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["results"] = str(d / "results")
    raw["domains"] = {k: {kk: str(ROOT / v) for kk, v in raw["domains"][k].items()} for k in experts}
    raw["bases"] = {"xs": {**raw["bases"]["xs"], "model": str(ROOT / "data/bases/xs"), "experts": experts}}
    raw["eval"] = {"max_examples": 8}
    raw["downstream"] = {"tasks": TASKS, "pool": 2, "max_k": 2, "limit": 10}
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return d, path, raw


def test_downstream_cli_end_to_end(study, monkeypatch):
    d, path, _ = study
    monkeypatch.chdir(ROOT)
    out = d / "ds.parquet"
    assert cli.main(["downstream", "--config", str(path), "--size", "xs", "--method", "average",
                     "--out", str(out), "--threads", "2"]) == 0
    t = pd.read_parquet(out)
    assert out.with_suffix(".csv").exists()
    assert list(t.columns) == DS.COLUMNS
    assert sorted(t["k"].unique()) == [0, 1, 2] and t["subset"].nunique() == 4  # base, 2 singles, the pair
    per = t.groupby("subset").size()
    assert (per == 1 + 2 * len(TASKS)).all()  # CE + (acc, acc_norm) per task
    sc = t[t["task"] != DS.CE_TASK]
    assert set(sc["task"]) == set(TASKS) and set(sc["metric"]) == {"acc", "acc_norm"}
    assert sc["value"].between(0, 1).all() and (sc["n"] == 10).all() and sc["stderr"].gt(0).all()
    ce = t[t["task"] == DS.CE_TASK]
    assert ce["value"].map(math.isfinite).all() and (~ce["higher_is_better"]).all()
    # the Fig 10 analogue draws from it and reports k90 for scores and CE
    from mergelaws.plots.downstream import plot_downstream

    sat = plot_downstream([out], d / "fig10.png")
    assert (d / "fig10.png").stat().st_size > 1000 and set(sat["task"]) == set(TASKS) | {DS.CE_TASK}


def test_in_memory_score_equals_the_saved_checkpoints(study, tmp_path, monkeypatch):
    """lm-eval on the live merged model (HFLM over the object) = lm-eval on it saved and reloaded."""
    from mergelaws import config, grid, sweep

    d, path, raw = study
    monkeypatch.chdir(ROOT)
    cfg = config.load(path)
    base_path = grid.base_dir(cfg, "xs")
    tok = models.load_tokenizer(base_path)
    model = models.load_model(base_path)
    live = models.float_state(model)
    doms = DS.pool(cfg)
    merger = sweep.build_merger(cfg, "ties", cfg["methods"]["ties"], model, live, base_path,
                                {k: grid.expert_dir(cfg, "xs", k) for k in doms}, doms, "cpu", "t", log=lambda *_: None)
    with torch.no_grad():
        merger.merge(doms, grid.subset_id(doms), out=live)
    tasks_dir = tmp_path / "tasks"
    for t in TASKS:
        DS.write_local_task(cfg, t, tasks_dir, limit=10)
    manager = DS.task_manager([str(tasks_dir)])
    mem = DS.score(DS.wrap_model(model, tok), TASKS, manager, limit=10, system_prompt=None)
    ckpt = tmp_path / "merged"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    from lm_eval.models.huggingface import HFLM

    disk = DS.score(HFLM(pretrained=str(ckpt), device="cpu", batch_size=16), TASKS, manager, limit=10,
                    system_prompt=None)
    assert [r[:2] for r in mem] == [r[:2] for r in disk]
    for a, b in zip(mem, disk):
        assert a[2] == pytest.approx(b[2], abs=1e-12), (a, b)
    shutil.rmtree(ckpt)


@pytest.mark.parametrize("change,needle", [
    ({"downstream": {"tasks": []}}, "downstream.tasks is empty"),
    ({"downstream": {"tasks": ["mergelaws_nosuch_mc"]}}, "names domain 'nosuch'"),
    ({"downstream": {"tasks": ["mergelaws_arithmetic_bogus"]}}, "kind one of"),
    ({"downstream": {"tasks": TASKS, "pool": ["arithmetic", "algebra"]}}, "downstream.pool names ['algebra']"),
    ({"downstream": {"tasks": TASKS, "include_path": "/nonexistent/tasks"}}, "include_path"),
])
def test_bad_downstream_config_is_one_line_exit_2(study, tmp_path, capsys, monkeypatch, change, needle):
    _, _, raw = study
    monkeypatch.chdir(ROOT)
    bad = copy.deepcopy(raw)
    bad.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = tmp_path / "x.parquet"
    assert cli.main(["downstream", "--config", str(path), "--size", "xs", "--method", "average",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
