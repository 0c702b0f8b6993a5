"""`mergelaws eval`: response-only cross-entropy of one model directory on JSONL(.gz) files.

Uses the sweep's own functions (``data.read_pairs`` / ``data.encode_pairs``: the model's own chat
template with a system prompt, the truncation rule; ``evaluate.evaluate_examples``), so its numbers
are the sweep's numbers for the same model, data, system prompt and max_len. Output (JSON, written atomically)::

    {"model": DIR, "max_len": N, "results": {FILE: {"loss": nats/token, "tokens": n,
     "examples": n, "truncated": n, "skipped": n}, ...}}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["run_eval", "add_parser"]


def run_eval(model_dir: str | Path, data_files: list[str], out: str | Path, max_len: int = 256,
             batch_tokens: int = 8192, max_examples: int | None = None, device: str = "auto",
             prompt_field: str = "prompt", response_field: str = "response", allow_bin: bool = False,
             system_prompt: str | None = None, dtype: str = "float32", log=print) -> dict:
    """Evaluate ``model_dir`` on every file of ``data_files``; write and return the results."""
    from mergelaws import data as D
    from mergelaws import io, models
    from mergelaws.evaluate import evaluate_examples

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


def cmd_eval(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_eval(args.model, args.data, args.out, max_len=args.max_len, batch_tokens=args.batch_tokens,
             max_examples=args.max_examples, device=args.device, allow_bin=args.allow_bin,
             system_prompt=None if args.no_system_prompt else args.system_prompt, dtype=args.dtype)


def add_parser(subparsers):
    """Register `mergelaws eval --model DIR --data FILE [--data FILE ...] --out FILE.json`."""
    p = subparsers.add_parser("eval", help="response-only cross-entropy of a model directory on JSONL(.gz) files")
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors + tokenizer)")
    p.add_argument("--data", required=True, action="append", help="JSONL(.gz) with prompt/response; repeatable")
    p.add_argument("--out", required=True, help="output JSON (written atomically)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example after truncation (default 256)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch (default 8192)")
    p.add_argument("--max-examples", type=int, default=None, help="first N examples of each file")
    from mergelaws.data import DEFAULT_SYSTEM_PROMPT

    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system turn rendered by the model's chat template (default: the paper's "
                        "'You are a helpful assistant.', as the config's system_prompt)")
    p.add_argument("--no-system-prompt", action="store_true",
                   help="give no system turn (the template's own default applies; the config's system_prompt: null)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is evaluated in (default float32; losses are accumulated in fp32)")
    add_run_args(p, device="auto")
    p.set_defaults(fn=cmd_eval)
    return p


def add_run_args(p, device: str) -> None:
    """--device, --threads and --allow-bin, shared by `mergelaws eval` and `mergelaws merge`."""
    p.add_argument("--device", default=device, help=f"cpu, cuda or auto (default {device})")
    p.add_argument("--threads", type=int)
    p.add_argument("--allow-bin", action="store_true",
                   help="also read pickle .bin weights (with torch.load(weights_only=True)); only for files you trust")
