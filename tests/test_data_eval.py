"""Tokenization, masking, batching and the response-only loss, on the shipped data and base."""

import gzip
import json

import pytest
import torch

from mergelaws import data as D
from mergelaws import evaluate


def test_mask_covers_exactly_the_response(cfg, tokenizer):
    pairs = D.read_pairs(cfg["domains"]["scripture"]["eval"], limit=20)
    for prompt, response in pairs:
        ex, _ = D.encode_pair(tokenizer, prompt, response, 10_000)
        n_prompt = sum(1 for t in ex.labels if t == D.IGNORE)
        # the tiny bases' own chat template: the prompt part is the user turn and the assistant
        # header, the target part the response and the end-of-turn (eos) token
        assert tokenizer.decode(ex.input_ids[:n_prompt]) == "<|user|>" + prompt + "<|assistant|>"
        assert tokenizer.decode(ex.labels[n_prompt:-1]) == response
        assert ex.labels[-1] == tokenizer.eos_token_id
        assert all(t != D.IGNORE for t in ex.labels[n_prompt:])


def test_the_chat_template_gives_the_same_tokens_as_prompt_and_response_tokenized_apart(cfg, tokenizer):
    """On the tiny template the response is isolated between special tokens, so rendering the whole
    conversation tokenizes exactly as the prompt part and the response part tokenized separately."""
    for d in ("code", "arithmetic", "quotes"):
        for prompt, response in D.read_pairs(cfg["domains"][d]["eval"], limit=30):
            p_ids, r_ids = D.split_ids(tokenizer, prompt, response)
            assert p_ids == tokenizer.encode("<|user|>" + prompt + "<|assistant|>", add_special_tokens=False)
            assert r_ids == tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]


def test_a_system_prompt_is_rendered_by_the_template_and_never_trained_on(tokenizer):
    ex, _ = D.encode_pair(tokenizer, "2+2?", "4", 10_000, system="You are a helpful assistant.")
    n_prompt = sum(1 for t in ex.labels if t == D.IGNORE)
    assert tokenizer.decode(ex.input_ids[:n_prompt]) == "You are a helpful assistant.\n<|user|>2+2?<|assistant|>"
    assert tokenizer.decode(ex.labels[n_prompt:]) == "4<|endoftext|>"


def test_a_tokenizer_without_chat_template_joins_prompt_and_response_as_plain_text(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ex, _ = D.encode_pair(plain, "2+2?", "4", 10_000, system="ignored: there is no place for it")
    n_prompt = sum(1 for t in ex.labels if t == D.IGNORE)
    assert plain.decode(ex.input_ids) == "2+2?\n4<|endoftext|>"
    assert plain.decode(ex.labels[n_prompt:]) == "4<|endoftext|>"


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|user|>{% endif %}")
    with pytest.raises(D.DataError, match="generation prompt"):
        D.encode_pair(odd, "2+2?", "4", 10_000)


def test_truncation_rule_is_counted(cfg, tokenizer):
    pairs = D.read_pairs(cfg["domains"]["code"]["train"], limit=200)
    enc = D.encode_pairs(tokenizer, pairs, 32)
    assert enc.truncated > 0
    assert all(len(e) <= 32 for e in enc.examples)
    assert all(sum(t == D.IGNORE for t in e.labels) <= 16 for e in enc.examples)


def test_bad_data_files_name_file_and_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(D.DataError, match="nope.jsonl"):
        D.read_pairs(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2"):
        D.read_pairs(bad)
    nofield = tmp_path / "nofield.jsonl.gz"
    with gzip.open(nofield, "wt") as fh:
        fh.write(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(D.DataError, match="prompt_field"):
        D.read_pairs(nofield)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(D.DataError, match="no examples"):
        D.read_pairs(empty)


def test_length_batches_respect_budget_and_keep_everything(cfg, tokenizer):
    enc = D.load_domain(cfg, "manpages", "eval", tokenizer, 128, limit=64)
    batches = D.length_batches(enc.examples, 1024)
    assert sum(len(b) for b in batches) == len(enc.examples)
    for b in batches:
        assert max(len(e) for e in b) * len(b) <= 1024 or len(b) == 1


def _naive_loss(model, examples):
    """Reference: one example at a time, HF forward with prompt labels = -100."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            lab = torch.tensor([e.labels])
            out = model(input_ids=ids, labels=lab)
            k = int((lab[:, 1:] != -100).sum())
            nll += float(out.loss.double()) * k
            n += k
    return nll / n, n


def test_loss_matches_naive_reference(cfg, tokenizer, xs_model):
    for domain in ("code", "quotes", "arithmetic"):
        enc = D.load_domain(cfg, domain, "eval", tokenizer, 128, limit=24)
        got = evaluate.evaluate_examples(xs_model, enc.examples, pad_id=tokenizer.pad_token_id, batch_tokens=700)
        ref, n = _naive_loss(xs_model, enc.examples)
        assert got.tokens == n
        assert abs(got.loss - ref) / ref < 1e-5, (domain, got.loss, ref)


def test_all_masked_batch_is_not_nan(tokenizer, xs_model):
    ex = D.Example([1, 2, 3, 4], [D.IGNORE] * 4)
    res = evaluate.evaluate_examples(xs_model, [ex], pad_id=tokenizer.pad_token_id)
    assert res.tokens == 0 and res.nll == 0.0
