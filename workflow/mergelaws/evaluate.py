"""Response-only, token-weighted cross-entropy in nats per token, fp32 accumulation.

The loss of a model on a domain is  sum over response tokens of -log p(x_t | x_<t)  divided
once by the number of response tokens (token-weighted, not a mean of per-batch means).
Logits are computed only at target positions and in row chunks, in fp32, so the full fp32
logits of a large vocabulary are never materialised at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergelaws.data import IGNORE, Example, length_batches, pad_batch

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
    """Token-weighted response cross-entropy of ``model`` on ``examples``."""
    was_training = model.training
    model.eval()
    total = LossSum()
    for batch in length_batches(examples, batch_tokens):
        ids, att, lab = (t.to(device) for t in pad_batch(batch, pad_id))
        nll, n = target_nll(model, ids, att, lab)
        total += LossSum(float(nll), n)
    model.train(was_training)
    return total
