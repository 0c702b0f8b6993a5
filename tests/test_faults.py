"""Faults injected into real processes: a sweep killed with SIGKILL resumes and gives the same table."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

DOMAINS = ["code", "quotes", "algebra"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mergelaws.cli", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, root):
    """A micro config over the shipped xs base with three quickly trained experts."""
    work = tmp_path_factory.mktemp("faults")
    d = root / "data" / "domains"
    cfg = {
        "results": str(work / "results"),
        "domains": {n: {"train": str(d / n / "train.jsonl.gz"), "eval": str(d / n / "eval.jsonl.gz")}
                    for n in DOMAINS},
        "bases": {"xs": {"model": str(root / "data" / "bases" / "xs")}},
        "train": {"steps": 6, "batch_size": 4, "max_len": 64, "device": "cpu"},
        "methods": {"dare": {}},
        "sweep": {"k": "all", "subsets_per_k": 3, "chunk": 1, "device": "cpu"},
        "eval": {"max_examples": 24, "max_len": 96},
    }
    path = work / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for dom in DOMAINS:
        proc = _cli("train", "--config", str(path), "--size", "xs", "--domain", dom,
                    "--out", str(work / "results" / "experts" / "xs" / dom), "--threads", "1")
        assert proc.returncode == 0, proc.stderr[-2000:]
    return work, path


def test_killed_sweep_resumes_to_the_same_table(trained):
    work, cfgfile = trained
    ref_out = work / "ref.parquet"
    proc = _cli("sweep", "--config", str(cfgfile), "--size", "xs", "--method", "dare", "--out", str(ref_out),
                "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = pd.read_parquet(ref_out)
    n_subsets = ref["subset"].nunique()

    out = work / "killed.parquet"
    partial = work / ".killed.parquet.partial"
    victim = subprocess.Popen([sys.executable, "-m", "mergelaws.cli", "sweep", "--config", str(cfgfile),
                               "--size", "xs", "--method", "dare", "--out", str(out), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("chunk-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    chunks_before = len(list(partial.glob("chunk-*.parquet")))
    assert 3 <= chunks_before < n_subsets, "the kill must land mid-sweep"
    assert not out.exists()  # nothing that looks complete

    proc = _cli("sweep", "--config", str(cfgfile), "--size", "xs", "--method", "dare", "--out", str(out),
                "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming, {chunks_before} of {n_subsets} subsets already done" in proc.stdout
    redone = n_subsets - chunks_before
    print(f"\nkill-and-resume: {chunks_before}/{n_subsets} subsets kept, {redone} evaluated after the kill")
    got = pd.read_parquet(out)
    pd.testing.assert_frame_equal(got, ref)  # value for value
    assert not partial.exists()  # progress is cleared once the table is complete


def test_changed_inputs_discard_partial_results(trained):
    from mergelaws import config, grid
    from mergelaws.sweep import PartialResults, fingerprint

    work, cfgfile = trained
    cfg = config.load(cfgfile)
    experts = {d: grid.expert_dir(cfg, "xs", d) for d in DOMAINS}
    key = fingerprint(cfg, "xs", "dare", grid.base_dir(cfg, "xs"), experts, grid.subsets(cfg))
    out = work / "fp.parquet"
    pr = PartialResults(out, key)
    pr.add(pd.DataFrame({"subset": ["sX"], "loss": [1.0]}))
    assert PartialResults(out, key).done_ids() == {"sX"}
    cfg["methods"]["dare"]["drop_rate"] = 0.5
    key2 = fingerprint(cfg, "xs", "dare", grid.base_dir(cfg, "xs"), experts, grid.subsets(cfg))
    assert key2 != key
    assert PartialResults(out, key2).done_ids() == set()


# ---- bad model input: each a clear error naming the directory and the fix ------------------

@pytest.fixture
def xs_copy(tmp_path, root):
    import shutil

    dst = tmp_path / "xs"
    shutil.copytree(root / "data" / "bases" / "xs", dst)
    return dst


def test_truncated_safetensors_is_refused_with_the_fix(xs_copy):
    from mergelaws import models

    f = xs_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(models.ModelError, match=r"xs could not be loaded .*copy it again or delete it"):
        models.load_model(xs_copy)


def test_directory_without_weights_and_pickle_checkpoints(xs_copy):
    from mergelaws import models

    (xs_copy / "model.safetensors").rename(xs_copy / "pytorch_model.bin")
    with pytest.raises(models.ModelError, match="no \\*.safetensors weights; mergelaws loads safetensors only"):
        models.load_model(xs_copy)
    (xs_copy / "config.json").unlink()
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.load_model(xs_copy)


def test_expert_of_another_base_is_refused(root):
    from mergelaws import models

    base = models.load_model(root / "data" / "bases" / "xs")
    other = models.load_model(root / "data" / "bases" / "s")
    with pytest.raises(models.ModelError, match="was it fine-tuned from this base"):
        models.check_compatible(base, other, "data/bases/s")


def test_killed_training_leaves_no_complete_looking_expert(trained):
    work, cfgfile = trained
    out = work / "results" / "experts" / "xs" / "killed"
    cfg = yaml.safe_load(cfgfile.read_text())
    cfg["train"]["steps"] = 100000  # long enough to be killed mid-way
    long_cfg = work / "long.yaml"
    long_cfg.write_text(yaml.safe_dump(cfg))
    victim = subprocess.Popen([sys.executable, "-m", "mergelaws.cli", "train", "--config", str(long_cfg),
                               "--size", "xs", "--domain", "code", "--out", str(out), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is really training
        line = victim.stderr.readline()
        if "[expert xs/code]" in line:
            break
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not out.exists()
    # the rerun starts the expert again and succeeds; stale temp dirs are cleaned up
    proc = _cli("train", "--config", str(cfgfile), "--size", "xs", "--domain", "code", "--out", str(out),
                "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not list(out.parent.glob(".killed.tmp-*"))


# ---- numerics: a merge with NaN weights is recorded as failed and poisons nothing ----------

def test_nonfinite_merge_is_recorded_and_excluded(trained, tmp_path):
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file

    from mergelaws import config, fit, grid
    from mergelaws.sweep import run_sweep

    work, cfgfile = trained
    cfg = config.load(cfgfile)
    experts = {d: grid.expert_dir(cfg, "xs", d) for d in DOMAINS}
    poisoned = tmp_path / "quotes"
    shutil.copytree(experts["quotes"], poisoned)
    weights = load_file(poisoned / "model.safetensors")
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    experts["quotes"] = str(poisoned)
    logs = []
    table = run_sweep(cfg, "xs", "dare", tmp_path / "nan.parquet", expert_dirs=experts, log=logs.append)
    failed = table[table["status"] != "ok"]
    assert set(failed["subset"]) == {s.id for s in grid.subsets(cfg) if "quotes" in s.members}
    assert failed["loss"].isna().all()
    assert any("non-finite weights" in line and "quotes" in line for line in logs)
    with pytest.warns(UserWarning, match="dropping .* failed merge"):
        views = fit.view_table(table, ["cross_domain"])
    assert np.isfinite(views["mean"]).all()
    k1 = views[views.k == 1]
    assert int(k1["n_subsets"].iloc[0]) == 2  # code and algebra; the quotes expert failed


def test_same_config_and_seed_train_the_same_expert(trained):
    import torch
    from safetensors.torch import load_file

    work, cfgfile = trained
    again = work / "again"
    proc = _cli("train", "--config", str(cfgfile), "--size", "xs", "--domain", "algebra", "--out", str(again),
                "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load_file(work / "results" / "experts" / "xs" / "algebra" / "model.safetensors")
    b = load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
