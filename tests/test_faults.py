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


def test_directory_without_weights(xs_copy):
    from mergelaws import models

    (xs_copy / "model.safetensors").unlink()
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

    from mergelaws import config, grid, laws
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
        views = laws.view_table(table, ["cross_domain"])
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


# ---- a kill at the worst moment of every step leaves nothing that looks complete -----------

def _steps(work: Path, cfgfile: Path, root: Path):
    """Each CLI step of the workflow with the files it writes, in the order it writes them."""
    r = work / "steps"
    tiny = work / "tiny.yaml"
    cfg = yaml.safe_load(cfgfile.read_text())
    cfg["bases"]["t"] = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                         "pretrain": {"steps": 3, "batch_size": 2, "seq_len": 32}}
    tiny.write_text(yaml.safe_dump(cfg))
    c = ["--config", str(cfgfile)]
    data = root / "data" / "domains" / "quotes" / "eval.jsonl.gz"
    merge_yaml = work / "merge.yaml"
    merge_yaml.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(root / "data" / "bases" / "xs"),
        "models": [{"model": str(work / "results" / "experts" / "xs" / d), "parameters": {"density": 0.5, "weight": 1.0}}
                   for d in DOMAINS[:2]]}))
    return [
        ("tokenizer", ["tokenizer", "--config", str(tiny), "--out", str(r / "tok")], [r / "tok"]),
        ("pretrain", ["pretrain", "--config", str(tiny), "--size", "t", "--tokenizer", str(root / "data" / "tokenizer"),
                      "--out", str(r / "bases" / "t"), "--threads", "1"], [r / "bases" / "t"]),
        ("train", ["train", *c, "--size", "xs", "--domain", "quotes", "--out", str(r / "experts" / "quotes"),
                   "--threads", "1"], [r / "experts" / "quotes"]),
        ("sweep", ["sweep", *c, "--size", "xs", "--method", "dare", "--out", str(r / "sweeps" / "1of1.parquet"),
                   "--threads", "1"], [r / "sweeps" / "1of1.parquet"]),
        ("aggregate", ["aggregate", str(r / "sweeps" / "1of1.parquet"), "--out", str(r / "losses.parquet")],
         [r / "losses.parquet", r / "losses.csv"]),
        ("fit", ["fit", str(r / "losses.parquet"), *c, "--out", str(r / "fits")],
         [r / "fits" / "fits.json", r / "fits" / "summary.csv"]),
        ("plan", ["plan", str(r / "losses.parquet"), "--fits", str(r / "fits" / "fits.json"), *c, "--n-boot", "20",
                  "--out", str(r / "plan")], [r / "plan" / "plan.json", r / "plan" / "plan.md"]),
        ("figures", ["figures", "--losses", str(r / "losses.parquet"), "--fits", str(r / "fits" / "fits.json"), *c,
                     "--out", str(r / "figures")],
         [r / "figures" / "loss_vs_k_in_domain.png", r / "figures" / "fig1_unified_cross_domain.pdf"]),
        ("eval", ["eval", "--model", str(root / "data" / "bases" / "xs"), "--data", str(data),
                  "--out", str(r / "eval.json")], [r / "eval.json"]),
        ("merge", ["merge", str(merge_yaml), str(r / "merged")], [r / "merged"]),
    ]


def _looks_complete(path: Path) -> None:
    from mergelaws import models

    if path.suffix == ".parquet":
        assert len(pd.read_parquet(path))
    elif path.suffix == ".csv":
        assert len(pd.read_csv(path))
    elif path.suffix == ".json":
        assert json.loads(path.read_text())
    elif path.suffix == ".md":
        assert path.read_text().strip()
    elif path.suffix in (".png", ".pdf"):
        assert path.read_bytes()[:5] in (b"\x89PNG\r", b"%PDF-")
    elif (path / "model.safetensors").exists():
        models.load_model(path)
    else:  # the tokenizer
        models.load_tokenizer(path)


def test_a_kill_before_any_rename_leaves_no_complete_looking_output(trained, root):
    """SIGKILL injected at the worst moment -- the output fully written under its temp name, not
    yet renamed -- for every file every step writes; then the rerun completes and cleans up."""
    from mergelaws.io import FAULT_ENV

    work, cfgfile = trained
    tried = []
    for step, argv, outputs in _steps(work, cfgfile, root):
        for target in outputs:
            env = {**os.environ, FAULT_ENV: target.name}
            proc = _cli(*argv, env=env)
            assert proc.returncode == -signal.SIGKILL, (step, target, proc.stderr[-2000:])
            assert not target.exists(), f"{step}: {target} exists after a kill before its rename"
            tried.append(f"{step}:{target.name}")
        proc = _cli(*argv)
        assert proc.returncode == 0, (step, proc.stderr[-2000:])
        for target in outputs:
            _looks_complete(target)
            leftovers = list(target.parent.glob(f".{target.name}.tmp-*"))
            assert not leftovers, f"{step}: temp files left beside {target}: {leftovers}"
    print(f"\nkilled before the rename of {len(tried)} outputs: {', '.join(tried)}")
    assert len(tried) >= 14


class _Payload:
    """A pickle that runs code when unpickled (what a hostile .bin checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bin_checkpoints_are_opt_in_and_never_run_code(xs_copy, tmp_path, root):
    import torch
    from safetensors.torch import load_file

    from mergelaws import models

    state = load_file(xs_copy / "model.safetensors")
    (xs_copy / "model.safetensors").unlink()
    torch.save(state, xs_copy / "pytorch_model.bin")
    # refused by default, with the two fixes named
    with pytest.raises(models.ModelError, match=r"only pickle \(\.bin\) weights.*allow_bin_checkpoints: true"):
        models.load_model(xs_copy)
    # opted in: the same weights as the safetensors original, read with weights_only=True
    got = models.load_model(xs_copy, allow_bin=True)
    ref = models.load_model(root / "data" / "bases" / "xs")
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)
    # a hostile pickle is refused even when opted in, and its code never runs
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, xs_copy / "pytorch_model.bin")
    with pytest.raises(models.ModelError, match="not a plain tensor checkpoint.*weights_only=True"):
        models.load_model(xs_copy, allow_bin=True)
    assert not marker.exists()
    # the CLI: refused without --allow-bin, named in the message
    torch.save(state, xs_copy / "pytorch_model.bin")
    data = root / "data" / "domains" / "quotes" / "eval.jsonl.gz"
    proc = _cli("eval", "--model", str(xs_copy), "--data", str(data), "--max-examples", "4",
                "--out", str(tmp_path / "e.json"))
    assert proc.returncode != 0 and "--allow-bin" in proc.stderr
    proc = _cli("eval", "--model", str(xs_copy), "--data", str(data), "--max-examples", "4", "--allow-bin",
                "--out", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_overlong_eval_examples_are_truncated_by_the_rule_and_counted(trained, tmp_path, root):
    """Eval examples longer than eval.max_len are truncated by the documented rule (at most half
    prompt, then the response's beginning), so none is left without a response token; the
    counts are logged and the sweep table carries `examples` and `skipped`; losses stay finite.
    (An example emptied by truncation -- only possible with max_len < 2 -- is skipped and
    counted: tests/test_data_eval.py.)"""
    import gzip

    from mergelaws import config, grid
    from mergelaws.sweep import run_sweep

    work, cfgfile = trained
    cfg = config.load(cfgfile)
    src = root / "data" / "domains" / "quotes" / "eval.jsonl.gz"
    lines = gzip.open(src, "rt").read().splitlines()[:10]
    long_prompt = json.dumps({"prompt": "word " * 400, "response": "an answer that will not fit"})
    ev = tmp_path / "quotes_eval.jsonl"
    ev.write_text("\n".join(lines + [long_prompt, long_prompt]) + "\n")
    cfg["domains"]["quotes"]["eval"] = str(ev)
    cfg["eval"]["max_examples"] = None
    cfg["sweep"]["k"] = [0, 1]
    experts = {d: grid.expert_dir(cfg, "xs", d) for d in DOMAINS}
    logs = []
    table = run_sweep(cfg, "xs", "dare", tmp_path / "t.parquet", expert_dirs=experts, log=logs.append)
    q = table[table.eval_domain == "quotes"]
    assert (q["examples"] == 12).all() and (q["skipped"] == 0).all()
    assert table["loss"].notna().all() and (table["status"] == "ok").all()
    assert any("eval set quotes" in line and "truncated" in line and "0 skipped" in line for line in logs)


def test_an_example_emptied_by_truncation_is_skipped_counted_and_never_nan(tokenizer, xs_model):
    from mergelaws import data as D
    from mergelaws.evaluate import evaluate_examples

    pairs = [("What is two plus two?", "Four.")] * 3
    enc = D.encode_pairs(tokenizer, pairs, max_len=1)  # no room for any target token
    assert enc.examples == [] and enc.skipped == 3 and enc.truncated == 3
    res = evaluate_examples(xs_model, enc.examples, pad_id=tokenizer.pad_token_id)
    assert res.tokens == 0 and res.nll == 0.0  # nothing evaluated, no NaN accumulated
    enc = D.encode_pairs(tokenizer, pairs + [("hi", "x" * 50)], max_len=8)
    assert enc.skipped == 0 and len(enc.examples) == 4 and enc.truncated >= 1
