"""Training: tiny-base pretraining and expert fine-tuning (response-only loss).

Backends for experts:

* ``torch`` — one process, plain PyTorch AdamW loop (CPU or one GPU). The embedded default.
* ``openrlhf`` — OpenRLHF's SFT trainer (``openrlhf.cli.train_sft``) under DeepSpeed, one
  subprocess per expert, on one GPU node or all nodes of a SLURM job; settings under
  ``train.openrlhf``. The data files, the loss-mask check, the command, the run and the
  verification live in :mod:`mergelaws.openrlhf`; the expert lands in the same place, in the
  same HF layout and with the same ``mergelaws_expert.json`` record as the torch backend's.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from mergelaws import data as D
from mergelaws import grid, models
from mergelaws.evaluate import target_nll
from mergelaws.progress import Progress


def lr_at(step: int, steps: int, lr: float, warmup_ratio: float) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    warm = max(1, int(round(warmup_ratio * steps)))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_loop(model, examples, *, steps: int, batch_size: int, lr: float, warmup_ratio: float,
               weight_decay: float, seed: int, pad_id: int, device: str, desc: str,
               autocast_dtype: torch.dtype | None = None) -> list[float]:
    """AdamW over seeded batches; returns the loss of every step."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    losses = []
    prog = Progress(steps, desc)
    for step, batch in enumerate(D.sample_batches(examples, batch_size, steps, seed)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup_ratio)
        ids, att, lab = (t.to(device) for t in D.pad_batch(batch, pad_id))
        with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            loss, _ = target_nll(model, ids, att, lab, reduction="mean")
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{desc}: loss became {loss_value} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss_value)
        prog.update(loss=losses[-1])
    prog.close()
    model.eval()
    return losses


def mixture_texts(cfg: dict, limit_per_domain: int | None = None) -> list[str]:
    """The general pretraining mixture: every domain's train split as plain text, interleaved.

    Plain text (prompt, newline, response), without the prompt/response template: the bases
    are general language models, and learning to answer in the template is part of what every
    expert's fine-tuning adds (a direction shared by all task vectors, as in the paper, whose
    experts all learn one teacher's response style).
    """
    per = []
    for d in grid.domains(cfg):
        spec = cfg["domains"][d]
        pairs = D.read_pairs(spec["train"], spec["prompt_field"], spec["response_field"], limit=limit_per_domain,
                           part="train")
        per.append([f"{p}\n{r}" for p, r in pairs])
    out = []
    for i in range(max(len(p) for p in per)):
        out.extend(p[i] for p in per if i < len(p))
    return out


def build_tokenizer(cfg: dict, out: str | Path):
    return models.train_tokenizer(mixture_texts(cfg), cfg["tokenizer"]["vocab_size"], out)


def pretrain(cfg: dict, size: str, out: str | Path, tokenizer_path: str | Path, device: str = "cpu") -> dict:
    """Pretrain a tiny base of ``size`` on the general mixture; deterministic for a given config."""
    spec = cfg["bases"][size]
    p = {**cfg["pretrain"], **spec.get("pretrain", {})}
    tok = models.load_tokenizer(tokenizer_path)
    model = models.init_model(models.tiny_config(spec, tok), seed=p["seed"]).to(device)
    examples = D.encode_plain(tok, mixture_texts(cfg), p["seq_len"])
    t0 = time.time()
    losses = train_loop(model, examples, steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                        warmup_ratio=p["warmup_ratio"], weight_decay=p["weight_decay"], seed=p["seed"],
                        pad_id=tok.pad_token_id, device=device, desc=f"pretrain {size}")
    record = {"size": size, "params": models.count_params(model), "spec": spec, "pretrain": p,
              "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
              "seconds": round(time.time() - t0, 2), "torch": torch.__version__}
    models.save_model(model.cpu(), out, tokenizer=tok, extra_files={"mergelaws_pretrain.json": record})
    return record


# ---- experts -------------------------------------------------------------------------------

def union_train_set(cfg: dict, domains: list[str], tokenizer, max_len: int,
                    limit: int | None = None) -> D.Encoded:
    """The train splits of ``domains`` as one set (each domain's examples in file order, domains
    in config order; the trainer's seeded shuffle mixes them, so each domain weighs in
    proportion to its examples), with the truncation counts summed."""
    parts = [D.load_domain(cfg, d, "train", tokenizer, max_len, limit=limit) for d in domains]
    return D.Encoded(examples=[e for p in parts for e in p.examples],
                     truncated=sum(p.truncated for p in parts), skipped=sum(p.skipped for p in parts),
                     stats={d: p.stats for d, p in zip(domains, parts)})


def train_expert_torch(cfg: dict, size: str, domain: str, base: str, out: str | Path, log=print,
                       *, domains: list[str] | None = None, steps: int | None = None,
                       kind: str = "expert") -> dict:
    """Fine-tune one expert from its base (fp32 master weights; bf16 autocast on a GPU by default),
    loss on the assistant turns rendered by the base's chat template; saved in the base's storage
    dtype, so an expert of a bf16 base is a bf16 checkpoint like the base.

    ``domains`` (with ``domain`` a label, e.g. "multitask"): train on the union of their train
    splits instead, for ``steps`` steps (default train.steps) — the multitask reference model
    (:mod:`mergelaws.multitask`), same trainer and settings as the experts."""
    t = grid.train_settings(cfg, size)
    if steps is not None:
        t["steps"] = int(steps)
    device = models.resolve_device(t["device"])
    on_gpu = device.startswith("cuda")
    tok = models.load_tokenizer(base)
    model = models.load_model(base, "float32", device, allow_bin=cfg["allow_bin_checkpoints"])
    if domains is None:
        enc = D.load_domain(cfg, domain, "train", tok, t["max_len"], limit=t["max_examples"])
    else:
        enc = union_train_set(cfg, domains, tok, t["max_len"], limit=t["max_examples"])
    log(f"{kind} {size}/{domain}: {len(enc.examples)} training examples, {enc.truncated} truncated to "
        f"max_len={t['max_len']} tokens, {enc.skipped} skipped (no response token left)"
        + ("" if not enc.truncated else "; raise train.max_len (or bases.<size>.train.max_len) to keep them whole"))
    dtype = t["dtype"] if t["dtype"] != "auto" else ("bfloat16" if on_gpu else "float32")
    checkpointing = t["gradient_checkpointing"] if t["gradient_checkpointing"] != "auto" else on_gpu
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    seed = _expert_seed(cfg["seed"], size, domain)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    t0 = time.time()
    losses = train_loop(model, enc.examples, steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"],
                        warmup_ratio=t["warmup_ratio"], weight_decay=t["weight_decay"], seed=seed,
                        pad_id=tok.pad_token_id, device=device, desc=f"{kind} {size}/{domain}",
                        autocast_dtype=autocast)
    if checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    store = models.storage_dtype(base)
    record = {"size": size, "domain": domain, "base": str(base), "backend": "torch", "train": t,
              **({"domains": list(domains)} if domains is not None else {}),
              "system_prompt": cfg.get("system_prompt"), "compute_dtype": dtype,
              "gradient_checkpointing": bool(checkpointing), "storage_dtype": store,
              "seed": seed, "data": enc.stats, "loss_first": losses[0],
              "loss_last": sum(losses[-10:]) / len(losses[-10:]), "seconds": round(time.time() - t0, 2)}
    model = model.cpu().to(models.resolve_dtype(store))
    models.save_model(model, out, tokenizer=tok, extra_files={"mergelaws_expert.json": record})
    return record


def train_expert_openrlhf(cfg: dict, size: str, domain: str, base: str, out: str | Path) -> dict:
    from mergelaws import openrlhf

    return openrlhf.train_expert(cfg, size, domain, base, out, seed=_expert_seed(cfg["seed"], size, domain))


BACKENDS = {"torch": train_expert_torch, "openrlhf": train_expert_openrlhf}


def train_expert(cfg: dict, size: str, domain: str, out: str | Path) -> dict:
    base = grid.base_dir(cfg, size)
    return BACKENDS[cfg["train"]["backend"]](cfg, size, domain, base, out)


def _expert_seed(seed: int, size: str, domain: str) -> int:
    import hashlib

    h = hashlib.sha256(f"{seed}:{size}:{domain}".encode()).hexdigest()
    return int(h[:12], 16)


def dump(record: dict) -> None:
    json.dump(record, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
