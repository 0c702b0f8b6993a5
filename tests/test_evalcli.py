"""`mergelaws eval` against a naive reference: one example at a time, HF forward, labels -100 on the prompt."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
XS = ROOT / "data" / "bases" / "xs"
FILES = [str(ROOT / "data" / "domains" / d / "eval.jsonl.gz") for d in ("arithmetic", "code")]
N, MAX_LEN = 12, 96  # small and short: code examples get truncated


def naive_loss(model, tok, path: str, n: int, max_len: int):
    """Independent reference: the documented template and truncation rule, written out here."""
    nll, tokens, examples, truncated, skipped = 0.0, 0, 0, 0, 0
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()][:n]
    for r in rows:
        p = tok.encode("<|user|>" + r["prompt"] + "<|assistant|>", add_special_tokens=False)
        a = tok.encode(r["response"], add_special_tokens=False) + [tok.eos_token_id]
        if len(p) + len(a) > max_len:
            truncated += 1
            kp = min(len(p), max_len // 2)
            p, a = p[len(p) - kp:], a[: max_len - kp]
        if not a:
            skipped += 1
            continue
        ids = torch.tensor([p + a])
        labels = torch.tensor([[-100] * len(p) + a])
        n_t = int((labels[0, 1:] != -100).sum())
        if n_t == 0:
            skipped += 1
            continue
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)  # HF: mean over shifted labels != -100
        nll += float(out.loss.double()) * n_t
        tokens += n_t
        examples += 1
    return {"loss": nll / tokens, "tokens": tokens, "examples": examples, "truncated": truncated,
            "skipped": skipped}


def test_run_eval_matches_naive_reference(tmp_path):
    from mergelaws import models
    from mergelaws.evaluate import evaluate_files as run_eval

    out = tmp_path / "eval.json"
    rec = run_eval(XS, FILES, str(out), max_len=MAX_LEN, batch_tokens=1024, max_examples=N, device="cpu",
                   log=lambda *_: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec))
    tok = models.load_tokenizer(XS)
    model = models.load_model(XS).eval()
    for f in FILES:
        got, ref = rec["results"][f], naive_loss(model, tok, f, N, MAX_LEN)
        assert set(got) == {"loss", "tokens", "examples", "truncated", "skipped"}
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for key in ("tokens", "examples", "truncated", "skipped"):
            assert got[key] == ref[key], (f, key)
    assert rec["results"][FILES[1]]["truncated"] > 0  # the truncation rule was exercised


def test_eval_cli_parser_and_errors(tmp_path):
    from mergelaws.cli import build_parser
    from mergelaws.data import DataError
    from mergelaws.evaluate import evaluate_files

    ap = build_parser()
    out = tmp_path / "o.json"
    args = ap.parse_args(["eval", "--model", str(XS), "--data", FILES[0], "--data", FILES[1], "--out", str(out),
                          "--max-len", "64", "--max-examples", "3", "--device", "cpu"])
    assert args.data == FILES and args.max_len == 64
    args.fn(args)
    rec = json.loads(out.read_text())
    assert list(rec["results"]) == FILES and all(r["examples"] == 3 for r in rec["results"].values())
    with pytest.raises(DataError, match="does not exist"):
        evaluate_files(XS, [str(tmp_path / "missing.jsonl")], str(tmp_path / "x.json"), device="cpu")
    assert not (tmp_path / "x.json").exists()
