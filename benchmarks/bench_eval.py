"""Time `mergelaws.evaluate.evaluate_examples` against the paper's evaluation loop, same process.

Usage (from the repo root, venv active)::

    python benchmarks/bench_eval.py                      # data/bases/m and xs, 64 eval examples x 9 domains
    python benchmarks/bench_eval.py --sizes m --per-domain 32 --max-len 512
    python benchmarks/bench_eval.py --device cuda        # both loops on a GPU

Ours: examples sorted by length and cut into batches of at most --batch-tokens padded tokens,
padded only to the longest in their batch; the LM head is applied only at response (target)
positions. The paper's (§5.4): every example padded to a fixed max length (2048 there, --max-len
here, default 256 -- the longer the pad, the larger the ratio), fixed batch size 10, a Hugging Face
forward with ``labels`` (full-vocabulary logits at every position), loss x target count summed
over batches and divided by the total count.

Both see the same tokenized examples (truncated to --max-len by the project's rule), both run
with torch.set_num_threads(--threads), and both must give the same token-weighted loss (to 1e-5
relative; asserted). Throughput is response tokens per second, best of --repeat. The machine is
shared: read the ratios, not the seconds. Prints a markdown table.

``--device cuda``: the model and both loops' batches on the GPU; the clock is read after
torch.cuda.synchronize(). A CPU reference loss is not recomputed: the GPU-vs-CPU agreement is
tests/test_cuda.py's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["code", "scripture", "dictionary", "thesaurus", "jargon", "quotes", "manpages", "arithmetic",
           "algebra"]


@torch.no_grad()
def paper_eval(model, examples, *, pad_id: int, max_len: int, batch_size: int = 10, device: str = "cpu"):
    """The paper's loop: pad to max_len, fixed batch size, HF loss (mean) x target count."""
    from mergelaws import data as D
    from mergelaws.data import IGNORE

    model.eval()
    nll, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        ids, att, lab = D.pad_batch(batch, pad_id, length=max_len)
        n = int((lab[:, 1:] != IGNORE).sum())
        if n == 0:
            continue
        loss = model(input_ids=ids.to(device), attention_mask=att.to(device), labels=lab.to(device)).loss
        nll += float(loss) * n
        count += n
    return nll / count, count


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so that a timer read after it counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeat: int, device: str = "cpu"):
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["m", "xs"], help="base names under data/bases")
    ap.add_argument("--per-domain", type=int, default=64, help="eval examples per domain (all 9 domains)")
    ap.add_argument("--max-len", type=int, default=256, help="truncation length and the paper loop's fixed pad")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="ours: padded tokens per batch")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu): where both loops run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {dev}: torch.cuda.is_available() is False")
    from mergelaws import data as D
    from mergelaws import models
    from mergelaws.evaluate import evaluate_examples

    rows = []
    for size in args.sizes:
        base = ROOT / "data" / "bases" / size
        tok = models.load_tokenizer(base)
        model = models.load_model(base, "float32", dev)
        examples = []
        for d in DOMAINS:
            pairs = D.read_pairs(ROOT / "data" / "domains" / d / "eval.jsonl.gz", limit=args.per_domain)
            examples += D.encode_pairs(tok, pairs, args.max_len).examples
        lens = [len(e) for e in examples]
        n_params = models.count_params(model)
        # warm-up (allocator, kernels) on a few examples, for both
        evaluate_examples(model, examples[:20], pad_id=tok.pad_token_id, batch_tokens=args.batch_tokens, device=dev)
        paper_eval(model, examples[:20], pad_id=tok.pad_token_id, max_len=args.max_len, device=dev)
        t_ours, res = best_of(lambda: evaluate_examples(model, examples, pad_id=tok.pad_token_id,
                                                        batch_tokens=args.batch_tokens, device=dev), args.repeat, dev)
        t_paper, (loss_p, n_p) = best_of(lambda: paper_eval(model, examples, pad_id=tok.pad_token_id,
                                                           max_len=args.max_len, device=dev), args.repeat, dev)
        assert res.tokens == n_p, (res.tokens, n_p)
        rel = abs(res.loss - loss_p) / abs(loss_p)
        assert rel < 1e-5, f"{size}: losses differ: ours {res.loss!r}, paper loop {loss_p!r} (rel {rel:.2e})"
        rows.append((size, n_params, len(examples), sum(lens) / len(lens), res.tokens, res.loss, rel,
                     res.tokens / t_ours, res.tokens / t_paper, t_ours, t_paper))
        print(f"{size}: done ({len(examples)} examples, {res.tokens} target tokens)", file=sys.stderr, flush=True)

    where = f"{args.threads} thread(s)" if torch.device(dev).type == "cpu" else \
        f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    print(f"\n### Eval throughput, {args.per_domain} eval examples x {len(DOMAINS)} domains, "
          f"pad {args.max_len} / batch 10 (paper loop) vs length-bucketed {args.batch_tokens} tokens (ours), "
          f"{where}, best of {args.repeat}\n")
    print("| base | params | examples | mean len | target tokens | loss | rel. diff | ours tok/s | paper-loop tok/s "
          "| ours s | paper-loop s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (size, p, ne, ml, nt, loss, rel, r_o, r_p, t_o, t_p) in rows:
        print(f"| {size} | {p / 1e6:.2f}M | {ne} | {ml:.0f} | {nt} | {loss:.5f} | {rel:.1e} | {r_o:,.0f} | {r_p:,.0f} "
              f"| {t_o:.2f} | {t_p:.2f} | {t_p / t_o:.1f}x |")


if __name__ == "__main__":
    sys.exit(main())
