"""Response-only, token-weighted cross-entropy in nats per token, fp32 accumulation.

The loss of a model on a domain is  sum over response tokens of -log p(x_t | x_<t)  divided
once by the number of response tokens (token-weighted, not a mean of per-batch means).
Logits are computed only at target positions and in row chunks, in fp32, so the full fp32
logits of a large vocabulary are never materialised at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelaws.data import IGNORE, Example, eval_batches, pad_batch

LOGIT_CHUNK_ROWS = 2048


@dataclass
class LossSum:
    nll: float = 0.0  # summed nats over target tokens
    tokens: int = 0

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    def __iadd__(self, other: "LossSum") -> "LossSum":
        self.nll += other.nll
        self.tokens += other.tokens
        return self


def _decoder_and_head(model):
    head = model.get_output_embeddings()
    decoder = getattr(model, model.base_model_prefix, None)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if head is None or decoder is None or softcap:
        return None, None
    return decoder, head


def target_nll(model, input_ids, attention_mask, labels, *, reduction: str = "sum"):
    """Negative log-likelihood of the labelled targets (labels shifted by one, -100 ignored).

    Returns (nll, n_targets) with nll an fp32 tensor (summed, or mean for reduction='mean').
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    n = int(mask.sum())
    if n == 0:  # an all-masked batch contributes nothing (never NaN)
        zero = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        return zero, 0
    decoder, head = _decoder_and_head(model)
    if decoder is None:  # generic path: full logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
        nll = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        h = hidden[:, :-1][mask]
        t = targets[mask]
        nll = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], LOGIT_CHUNK_ROWS):
            logits = head(h[i:i + LOGIT_CHUNK_ROWS]).float()
            nll = nll + torch.nn.functional.cross_entropy(logits, t[i:i + LOGIT_CHUNK_ROWS], reduction="sum")
    if reduction == "mean":
        return nll / n, n
    return nll, n


@torch.no_grad()
def evaluate_examples(model, examples: list[Example], *, pad_id: int, batch_tokens: int = 8192,
                      device: str | torch.device = "cpu") -> LossSum:
    """Token-weighted response cross-entropy of ``model`` on ``examples``, in length-sorted batches
    of at most ``batch_tokens`` padded positions, each padded by at most ``data.MAX_WASTE`` of its tokens."""
    was_training = model.training
    model.eval()
    total = LossSum()
    for batch in eval_batches(examples, batch_tokens):
        ids, att, lab = (t.to(device) for t in pad_batch(batch, pad_id))
        nll, n = target_nll(model, ids, att, lab)
        total += LossSum(float(nll), n)
    model.train(was_training)
    return total


# ---- `mergelaws eval`: a model directory on JSONL(.gz) files ----------------------------------

def evaluate_files(model_dir: str | Path, data_files: list[str], out: str | Path, max_len: int = 256,
             batch_tokens: int = 8192, max_examples: int | None = None, device: str = "auto",
             prompt_field: str = "prompt", response_field: str = "response", allow_bin: bool = False,
             system_prompt: str | None = None, dtype: str = "float32", log=print) -> dict:
    """`mergelaws eval`: the response-only loss of ``model_dir`` on every file of ``data_files``,
    through the sweep's own functions (the model's chat template with ``system_prompt``, the
    truncation rule, :func:`evaluate_examples`), so its numbers are the sweep's for the same model,
    data, system prompt and max_len. Writes ``out`` atomically and returns it::

        {"model": DIR, "max_len": N, "results": {FILE: {"loss": nats/token, "tokens": n,
         "examples": n, "truncated": n, "skipped": n}, ...}}
    """
    from mergelaws import data as D
    from mergelaws import io, models

    if not data_files:
        raise D.DataError("no data file given; pass --data FILE at least once")
    if max_len < 2:
        raise D.DataError(f"max_len = {max_len} is too small; use at least 2 tokens")
    dev = models.resolve_device(device)
    tok = models.load_tokenizer(model_dir)
    model = models.load_model(model_dir, dtype, dev, allow_bin=allow_bin)
    results: dict[str, dict] = {}
    t0 = time.time()
    for f in data_files:
        pairs = D.read_pairs(f, prompt_field, response_field, limit=max_examples, part="eval")
        enc = D.encode_pairs(tok, pairs, max_len, system=system_prompt)
        if not enc.examples:
            raise D.DataError(f"data file {f} has no usable example after truncation to {max_len} tokens; "
                              f"raise --max-len")
        res = evaluate_examples(model, enc.examples, pad_id=tok.pad_token_id, batch_tokens=batch_tokens, device=dev)
        results[str(f)] = {"loss": res.loss, "tokens": res.tokens, "examples": len(enc.examples),
                           "truncated": enc.truncated, "skipped": enc.skipped}
        log(f"eval {f}: loss {res.loss:.4f} nats/token over {res.tokens} tokens ({len(enc.examples)} examples)")
    record = {"model": str(model_dir), "max_len": max_len, "max_examples": max_examples,
              "system_prompt": system_prompt, "chat_template": D.has_chat_template(tok), "dtype": dtype,
              "seconds": round(time.time() - t0, 3), "results": results}
    io.write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
