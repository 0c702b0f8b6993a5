"""Downstream scores through lm-evaluation-harness (mergelaws.downstream; App. K, Fig 10): the
local task builder, `mergelaws downstream` end to end on the xs base with two small experts, the
in-memory lm-eval score equal to lm-eval's score of the same model saved as a checkpoint, the
Fig 10 analogue, bad config -> one line, exit 2; free_merging's per-domain expert while a
domain's tasks are scored (against fr_merging), and a killed run resumed from its sidecar."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
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


@pytest.fixture(scope="module")
def uninterrupted(study):
    """`mergelaws downstream` (average) on the study, run once: its table's path."""
    d, path, _ = study
    out = d / "ds.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        assert cli.main(["downstream", "--config", str(path), "--size", "xs", "--method", "average",
                         "--out", str(out), "--threads", "2"]) == 0
    return out


def test_downstream_cli_end_to_end(study, uninterrupted):
    d, path, _ = study
    out = uninterrupted
    t = pd.read_parquet(out)
    assert not DS.partial_path(out).exists()  # the sidecar goes once the table is written
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


def test_fig10_cli_draws_both_formats_and_the_saturation_table(study, uninterrupted, capsys):
    d, _, _ = study
    assert cli.main(["fig10", str(uninterrupted), "--out", str(d / "f10" / "fig10_downstream"),
                     "--saturation", str(d / "f10" / "saturation.csv")]) == 0
    for ext in (".png", ".pdf"):
        assert (d / "f10" / f"fig10_downstream{ext}").stat().st_size > 1000
    sat = pd.read_csv(d / "f10" / "saturation.csv")
    assert set(sat["task"]) == set(TASKS) | {DS.CE_TASK}
    assert not list((d / "f10").glob(".*tmp*"))  # written atomically, no temporary left
    capsys.readouterr()
    assert cli.main(["fig10", str(d / "missing.parquet"), "--out", str(d / "f10" / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.parquet" in err[0] and "mergelaws downstream" in err[0]
    for bad, content in (("corrupt.parquet", b"garbage"), ("empty.parquet", b"")):
        (d / bad).write_bytes(content)
        assert cli.main(["fig10", str(d / bad), "--out", str(d / "f10" / "y")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad in err[0] and not list((d / "f10").glob("y.*"))


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
    manager = DS.task_manager([str(tasks_dir)], defaults=False)
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


# ---- free_merging: each domain's tasks scored with that domain's own expert ---------------------

def test_task_domains_groups_by_known_domain():
    assert DS.task_domains(["mergelaws_code_mc", "arc_easy", "mergelaws_code_answer", "mergelaws_quotes_mc",
                            "gsm8k"]) == [("code", ["mergelaws_code_mc", "mergelaws_code_answer"]),
                                          (None, ["arc_easy", "gsm8k"]), ("quotes", ["mergelaws_quotes_mc"])]


def test_free_merging_adds_the_domain_expert_only_to_its_tasks(study, tmp_path, monkeypatch):
    """free_merging vs fr_merging on the same subsets: lm-eval's log-likelihoods of a domain's task
    (and the table's scores) differ exactly when that domain's expert is in the subset; a task of
    no known domain (an include_path YAML) is scored on the plain merge, logged once; the CE rows
    take each eval domain's own expert (as the sweep)."""
    from lm_eval.models.huggingface import HFLM

    from mergelaws import config

    d, _, raw = study
    monkeypatch.chdir(ROOT)
    toy = tmp_path / "toy"  # the arithmetic mc task under a name with no domain
    DS.write_local_task(config.load(d / "config.yaml"), "mergelaws_arithmetic_mc", toy, limit=6)
    spec = yaml.safe_load((toy / "mergelaws_arithmetic_mc.yaml").read_text())
    (toy / "mergelaws_arithmetic_mc.yaml").unlink()
    (toy / "toy_arith_mc.yaml").write_text(yaml.safe_dump({**spec, "task": "toy_arith_mc"}, sort_keys=False))
    tasks = [*TASKS, "toy_arith_mc"]
    raw = copy.deepcopy(raw)
    raw["methods"] = {"fr_merging": {}, "free_merging": {}}
    raw["downstream"] = {"tasks": tasks, "pool": 2, "max_k": 2, "limit": 6, "include_path": str(toy)}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path)

    calls: list[list] = []  # per lm-eval call: [its tasks, the log-likelihoods lm-eval computed]
    real_score, real_ll = DS.score, HFLM.loglikelihood

    def spy_score(lm, group, *a, **k):
        calls.append([tuple(group), None])
        return real_score(lm, group, *a, **k)

    def spy_ll(self, requests, *a, **k):
        res = real_ll(self, requests, *a, **k)
        calls[-1][1] = [float(r[0]) for r in res]
        return res

    monkeypatch.setattr(DS, "score", spy_score)
    monkeypatch.setattr(HFLM, "loglikelihood", spy_ll)
    tables, seen, logs = {}, {}, {}
    for m in ("fr_merging", "free_merging"):
        calls.clear()
        logs[m] = []
        tables[m] = DS.run_downstream(cfg, "xs", m, tmp_path / f"{m}.parquet", log=logs[m].append)
        seen[m] = [list(c) for c in calls]
    chosen = DS.subsets(cfg)
    groups = DS.task_domains(tasks)
    assert [g for g, _ in groups] == ["arithmetic", "dictionary", None]
    assert len(seen["free_merging"]) == len(chosen) * len(groups)  # one call per (subset, domain)
    for i, sub in enumerate(chosen):  # no running sums: the subsets in their order
        for j, (dom, group) in enumerate(groups):
            (g_fr, ll_fr), (g_free, ll_free) = seen["fr_merging"][i * 3 + j], seen["free_merging"][i * 3 + j]
            assert g_fr == g_free == tuple(group) and len(ll_fr) == len(ll_free) == 6 * 4 * len(group)
            if dom in sub.members:
                assert sum(a != b for a, b in zip(ll_fr, ll_free)) > len(ll_fr) / 2, (sub.label, dom)
            else:
                assert ll_fr == ll_free, (sub.label, dom)
    fr, free = tables["fr_merging"], tables["free_merging"]
    keys = ["k", "subset", "members", "task", "metric", "n"]
    pd.testing.assert_frame_equal(fr[keys], free[keys])
    dom_of = {t: (DS.parse_local(t) or (None,))[0] for t in tasks}
    plain = [dom_of.get(t) not in m.split("+") for t, m in zip(fr["task"], fr["members"])]
    scores = fr["task"] != DS.CE_TASK
    same = scores & pd.Series(plain)
    assert same.sum() > len(chosen) * 2 and (fr["task"][same] == "toy_arith_mc").sum() == len(chosen) * 2
    assert (fr.loc[same, "value"].to_numpy() == free.loc[same, "value"].to_numpy()).all()
    ce = ~scores
    base = ce & (fr["k"] == 0)
    assert (fr.loc[base, "value"].to_numpy() == free.loc[base, "value"].to_numpy()).all()
    assert (fr.loc[ce & ~base, "value"].to_numpy() != free.loc[ce & ~base, "value"].to_numpy()).all()
    once = [ln for ln in logs["free_merging"] if "no known domain" in ln]
    assert len(once) == 1 and "toy_arith_mc" in once[0]
    assert not any("no known domain" in ln for ln in logs["fr_merging"])


# ---- resume: a killed run keeps its finished subsets --------------------------------------------

class Killed(Exception):
    pass


PROGRESS = re.compile(r"downstream xs/average (\d)/4 subset=(\S+) k=(\d) \d+\.\ds ~\d+s left")


def test_a_killed_run_resumes_from_its_sidecar(study, uninterrupted, tmp_path, monkeypatch):
    """Killed after the 2nd subset (a hook raising once its rows are in the sidecar), rerun: the
    table equals the uninterrupted run's (running sums replayed), the 2 finished subsets are not
    scored again, the sidecar is removed after the table is written; lm-eval's loggers are at
    WARNING while it scores and restored afterwards; one progress line per subset."""
    import lm_eval

    from mergelaws import config

    d, path, _ = study
    monkeypatch.chdir(ROOT)
    cfg = config.load(path)
    out = tmp_path / "ds.parquet"
    calls, added, levels = [], [], []
    real_score, real_add, real_eval = DS.score, DS.SubsetRows.add, lm_eval.simple_evaluate

    def spy_score(lm, group, *a, **k):
        calls.append(tuple(group))
        return real_score(lm, group, *a, **k)

    def spy_eval(*a, **k):
        levels.append(logging.getLogger("lm_eval").level)
        return real_eval(*a, **k)

    def add(self, sid, rows, kill_after=None):
        real_add(self, sid, rows)
        added.append(sid)
        if len(added) == kill_after:
            raise Killed

    monkeypatch.setattr(DS, "score", spy_score)
    monkeypatch.setattr(lm_eval, "simple_evaluate", spy_eval)
    monkeypatch.setattr(DS.SubsetRows, "add", lambda self, sid, rows: add(self, sid, rows, kill_after=2))
    lm_logger = logging.getLogger("lm_eval")
    old_level = lm_logger.level
    lm_logger.setLevel(logging.INFO)
    try:
        first = []
        with pytest.raises(Killed):
            DS.run_downstream(cfg, "xs", "average", out, log=first.append)
        assert lm_logger.level == logging.INFO  # restored, even on the way out of an exception
        assert not out.exists()
        side = DS.partial_path(out)
        lines = side.read_text().splitlines()
        assert len(lines) == 3 and json.loads(lines[0])["settings"]["tasks"] == TASKS  # header + 2 subsets
        done_first = list(added)
        assert len(calls) == 2 * 2  # 2 subsets x 2 domains' tasks

        monkeypatch.setattr(DS.SubsetRows, "add", lambda self, sid, rows: add(self, sid, rows))
        calls.clear()
        added.clear()
        second = []
        table = DS.run_downstream(cfg, "xs", "average", out, log=second.append)
        assert lm_logger.level == logging.INFO
    finally:
        lm_logger.setLevel(old_level)
    ids = [s.id for s in DS.subsets(cfg)]
    assert len(added) == 2 and set(added) == set(ids) - set(done_first)  # the finished ones not recomputed
    assert len(calls) == 2 * 2
    assert levels and set(levels) == {logging.WARNING}
    want = pd.read_parquet(uninterrupted)
    pd.testing.assert_frame_equal(table, want)
    pd.testing.assert_frame_equal(pd.read_parquet(out), want)
    assert out.with_suffix(".csv").exists() and not side.exists()
    assert any("resuming: 2 of 4 subsets already scored" in ln for ln in second)
    # one progress line per subset scored (the kill came as the 2nd subset's rows were kept)
    prog = {n: [m for m in map(PROGRESS.fullmatch, log) if m] for n, log in (("first", first), ("second", second))}
    assert [m.group(1) for m in prog["first"]] == ["1"] and [m.group(1) for m in prog["second"]] == ["3", "4"]
    labels = {s.id: (s.label or "base") for s in DS.subsets(cfg)}
    assert [m.group(2) for m in prog["second"]] == [labels[i] for i in added]
    assert [m.group(3) for m in prog["second"]] == [str(s.k) for i in added for s in DS.subsets(cfg) if s.id == i]


def test_sidecar_keeps_whole_lines_and_discards_other_settings(tmp_path):
    out = tmp_path / "t.parquet"
    key = {"tasks": ["a"], "limit": 10, "subsets": ["base", "s1"]}
    logs = []
    rows = [("xs", 7, "average", 0, "base", "", "a", "acc", 0.25, float("nan"), 10, True),
            ("xs", 7, "average", 0, "base", "", "cross_entropy", "loss", 3.1, float("nan"), 8, False)]
    p = DS.SubsetRows(out, key, "t", logs.append)
    assert p.done == {} and p.path == tmp_path / "t.parquet.partial.jsonl" and not logs
    p.add("base", rows)
    with open(p.path, "a") as f:  # a kill in the middle of the next line
        f.write('{"subset": "s1", "rows": [["xs", 7')
    q = DS.SubsetRows(out, key, "t", logs.append)
    assert list(q.done) == ["base"] and not logs
    got = q.done["base"]
    assert [r[:9] for r in got] == [r[:9] for r in rows] and math.isnan(got[0][9]) and got[1][-1] is False
    assert q.path.read_text().count("\n") == 2 and q.path.read_text().endswith("\n")  # the cut line gone
    r = DS.SubsetRows(out, {**key, "limit": 20}, "t", logs.append)
    assert r.done == {} and len(logs) == 1 and "discarding" in logs[0] and "limit" in logs[0]
    assert "tasks" not in logs[0] and len(r.path.read_text().splitlines()) == 1
    r.clear()
    assert not r.path.exists()


def test_resume_settings_follow_the_config(study, monkeypatch):
    from mergelaws import config, grid

    d, path, raw = study
    monkeypatch.chdir(ROOT)

    def key(change=None, method="average"):
        r = copy.deepcopy(raw)
        r["downstream"].update(change or {})
        p = d / "k.yaml"
        p.write_text(yaml.safe_dump(r))
        cfg = config.load(p)
        doms = DS.pool(cfg)
        return DS.resume_settings(cfg, "xs", method, grid.base_dir(cfg, "xs"),
                                  {x: grid.expert_dir(cfg, "xs", x) for x in doms}, DS.subsets(cfg))

    k = key()
    assert k == key() and k["tasks"] == TASKS and k["limit"] == 10 and k["size"] == "xs"
    assert k["subsets"] == [s.id for s in DS.subsets(config.load(path))]
    for other in (key({"limit": 5}), key({"tasks": TASKS[:1]}), key({"max_k": 1}), key(method="ties")):
        assert other != k
