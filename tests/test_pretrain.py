"""The shipped tokenizer and tiny bases are reproduced by the project's own rules' commands."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mergelaws import config, models
from mergelaws import data as D
from mergelaws.evaluate import evaluate_examples


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "mergelaws.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tokenizer_is_reproduced(tmp_path, root, monkeypatch):
    monkeypatch.chdir(root)
    _cli("tokenizer", "--config", "config.yaml", "--out", str(tmp_path / "tok"))
    rebuilt = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    shipped = json.loads((root / "data" / "tokenizer" / "tokenizer.json").read_text())
    assert rebuilt == shipped
    for size in ("xs", "s", "m"):
        in_base = json.loads((root / "data" / "bases" / size / "tokenizer.json").read_text())
        assert in_base["model"]["vocab"] == shipped["model"]["vocab"]


@pytest.mark.slow
def test_pretrain_reproduces_shipped_xs(tmp_path, root, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "xs"
    _cli("pretrain", "--config", "config.yaml", "--size", "xs", "--tokenizer", "data/tokenizer",
         "--out", str(out), "--threads", "1")
    got = load_file(out / "model.safetensors")
    ref = load_file(root / "data" / "bases" / "xs" / "model.safetensors")
    assert got.keys() == ref.keys()
    identical = all(torch.equal(got[k], ref[k]) for k in ref)
    if not identical:  # another CPU's kernels may round differently; then the model must still match
        worst = max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-8)) for k in ref)
        assert worst < 0.05, f"rebuilt xs differs from the shipped one by {worst:.3g} (relative)"
        cfg = config.load("config.yaml")
        tok = models.load_tokenizer(out)
        losses = []
        for path in (out, root / "data" / "bases" / "xs"):
            model = models.load_model(path)
            ex = D.load_domain(cfg, "scripture", "eval", tok, 128, limit=32).examples
            losses.append(evaluate_examples(model, ex, pad_id=tok.pad_token_id).loss)
        assert abs(losses[0] - losses[1]) / losses[1] < 0.01, losses
    record = json.loads((out / "mergelaws_pretrain.json").read_text())
    assert record["loss_last"] < record["loss_first"] - 2.0  # it really learned
