"""Domain corpora -> tokenized examples with response-only labels; length-bucketed batches.

An example is the prompt and the response joined by the project's template::

    <|user|>{prompt}<|assistant|>{response}<|endoftext|>

The prompt part and the response part are tokenized separately and concatenated, so the
boundary between them is exact (no off-by-one from a BPE merge across it). Labels are -100
on the prompt and the target ids on the response and the end-of-text token: the loss is on
the response, as in the paper.

Truncation rule (documented, counted): an example longer than ``max_len`` tokens keeps at
most ``max_len // 2`` prompt tokens (the prompt's end, nearest the response) and fills the rest
with the response's beginning. An example left with no response token is skipped and counted.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

USER, ASSISTANT = "<|user|>", "<|assistant|>"
IGNORE = -100


class DataError(ValueError):
    """A data file problem, naming the file and the fix."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Encoded:
    examples: list[Example]
    truncated: int = 0
    skipped: int = 0
    stats: dict = field(default_factory=dict)


def _open(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_pairs(path: str | Path, prompt_field: str = "prompt", response_field: str = "response",
               limit: int | None = None, part: str | None = None) -> list[tuple[str, str]]:
    """Read (prompt, response) pairs from a JSONL(.gz) file, with errors naming file and line,
    or from ``hf://`` dataset URIs (see :func:`read_hub_pairs`)."""
    if str(path).startswith("hf://"):
        return read_hub_pairs(str(path), prompt_field, response_field, limit=limit, part=part)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the domain's train/eval path in the config")
    pairs = []
    with _open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(prompt_field), str) \
                    or not isinstance(obj.get(response_field), str):
                raise DataError(f"{path}:{lineno} lacks string fields '{prompt_field}' and '{response_field}'; "
                                f"set prompt_field/response_field for this domain in the config")
            pairs.append((obj[prompt_field], obj[response_field]))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise DataError(f"data file {path} holds no examples; a domain needs at least one prompt/response pair")
    return pairs


# ---- hub datasets -----------------------------------------------------------------------

HUB_KEYS = {"config", "split", "format", "holdout", "limit", "seed", "prompt", "response"}


def read_hub_pairs(uri: str, prompt_field: str = "prompt", response_field: str = "response",
                   limit: int | None = None, part: str | None = None) -> list[tuple[str, str]]:
    """Pairs from one or more datasets loaded with ``datasets.load_dataset``, joined by ``|``::

        hf://<dataset id or local dir>?config=..&split=train&format=messages&holdout=200&<column>=<value>

    ``format=messages``: prompt = the first user turn, response = the first assistant turn of a
    ``messages`` list; otherwise the ``prompt``/``response`` keys (or the domain's
    prompt_field/response_field) name the columns. Any other key filters rows on a column's
    value; a key given several times keeps the rows whose value is any of them
    (``problem_type=Algebra&problem_type=Inequalities``). ``holdout=N`` splits the (filtered,
    seeded-shuffled) pool: the eval part is its first N rows and the train part the rest, so
    train and eval URIs that share the pool and N are disjoint. ``limit=N`` keeps the first N
    rows of the part.
    """
    from urllib.parse import parse_qsl

    out: list[tuple[str, str]] = []
    for source in uri.split("|"):
        spec = source[len("hf://"):] if source.startswith("hf://") else source
        ident, _, query = spec.partition("?")
        pairs = parse_qsl(query, keep_blank_values=True)
        q = dict(pairs)
        filters: dict[str, set[str]] = {}
        for k, v in pairs:
            if k not in HUB_KEYS:
                filters.setdefault(k, set()).add(v)
        try:
            import datasets

            ds = datasets.load_dataset(ident, name=q.get("config"), split=q.get("split", "train"))
        except Exception as exc:  # noqa: BLE001 - the hub's errors are many; name the source
            raise DataError(f"dataset {source} could not be loaded ({type(exc).__name__}: {exc}); check the id, "
                            f"config and split, and that the machine can reach the hub or its cache") from None
        for col in filters:
            if col not in ds.column_names:
                raise DataError(f"dataset {source}: no column '{col}' to filter on (columns: "
                                f"{', '.join(ds.column_names)}); remove '{col}=' or name an existing column")
        keep = range(len(ds))
        for col, values in filters.items():
            column = ds[col]
            keep = [i for i in keep if str(column[i]) in values]
            if not keep:
                raise DataError(_no_rows_message(source, ds, filters, col))
        rows = list(ds.select(keep)) if filters else list(ds)
        if "holdout" in q:
            import random as _random

            order = list(range(len(rows)))
            _random.Random(f"mergelaws-holdout:{q.get('seed', '0')}").shuffle(order)
            n = int(q["holdout"])
            pick = order[:n] if part == "eval" else order[n:]
            rows = [rows[i] for i in pick]
        if "limit" in q:
            rows = rows[: int(q["limit"])]
        pf, rf = q.get("prompt", prompt_field), q.get("response", response_field)
        for r in rows:
            if q.get("format") == "messages":
                msgs = r.get("messages") or []
                user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
                bot = next((m["content"] for m in msgs if m.get("role") == "assistant"), None)
            else:
                user, bot = r.get(pf), r.get(rf)
            if isinstance(user, str) and isinstance(bot, str):
                out.append((user, bot))
    if not out:
        raise DataError(f"{uri} gives no prompt/response pairs for the {part or 'requested'} part; check its "
                        f"filters, holdout and format")
    return out[:limit] if limit is not None else out


def _no_rows_message(source: str, ds, filters: dict[str, set[str]], col: str) -> str:
    """Name the filter that left no rows and the most common values its column does hold."""
    from collections import Counter

    counts = Counter(str(v) for v in ds[col]).most_common(12)
    held = ", ".join(f"{v!r} ({n})" for v, n in counts)
    asked = " or ".join(repr(v) for v in sorted(filters[col]))
    return (f"dataset {source}: no row has {col} = {asked} (after the filters before it); "
            f"the column's most common values: {held}; fix '{col}=' in the URI")


def encode_pair(tokenizer, prompt: str, response: str, max_len: int) -> tuple[Example | None, bool]:
    """Tokenize one pair with response-only labels; returns (example or None if empty, truncated)."""
    p_ids = tokenizer.encode(USER + prompt + ASSISTANT, add_special_tokens=False)
    r_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    truncated = False
    if len(p_ids) + len(r_ids) > max_len:
        truncated = True
        keep_p = min(len(p_ids), max_len // 2)
        p_ids = p_ids[len(p_ids) - keep_p:]
        r_ids = r_ids[: max_len - keep_p]
    if not r_ids:
        return None, truncated
    return Example(p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids), truncated


def encode_pairs(tokenizer, pairs, max_len: int) -> Encoded:
    out = Encoded([])
    for prompt, response in pairs:
        ex, trunc = encode_pair(tokenizer, prompt, response, max_len)
        out.truncated += trunc
        if ex is None or ex.n_targets == 0:
            out.skipped += 1
            continue
        out.examples.append(ex)
    out.stats = {"examples": len(out.examples), "truncated": out.truncated, "skipped": out.skipped,
                 "target_tokens": sum(e.n_targets for e in out.examples)}
    return out


def encode_plain(tokenizer, texts, max_len: int) -> list[Example]:
    """Plain language-model examples (loss on every token), for pretraining."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)[: max_len - 1] + [tokenizer.eos_token_id]
        if len(ids) >= 2:
            out.append(Example(ids, list(ids)))
    return out


def load_domain(cfg: dict, domain: str, split: str, tokenizer, max_len: int,
                limit: int | None = None) -> Encoded:
    spec = cfg["domains"][domain]
    pairs = read_pairs(spec[split], spec["prompt_field"], spec["response_field"], limit=limit, part=split)
    enc = encode_pairs(tokenizer, pairs, max_len)
    if not enc.examples:
        raise DataError(f"domain '{domain}' ({spec[split]}) has no usable {split} example after "
                        f"truncation to {max_len} tokens; raise max_len or check the responses")
    return enc


# ---- batching ------------------------------------------------------------------------------

def pad_batch(examples: list[Example], pad_id: int):
    """Right-pad a list of examples into (input_ids, attention_mask, labels) tensors."""
    import torch

    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    lab = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        m = len(e)
        ids[i, :m] = torch.tensor(e.input_ids)
        att[i, :m] = 1
        lab[i, :m] = torch.tensor(e.labels)
    return ids, att, lab


def length_batches(examples: list[Example], batch_tokens: int) -> list[list[Example]]:
    """Sort by length and cut into batches whose padded size stays within ``batch_tokens``.

    Sequences are never padded to a fixed max length, only to the longest in their batch,
    which (being sorted) is close to the others.
    """
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]), i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        ln = len(examples[i])
        if cur and max(cur_max, ln) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(examples[i])
        cur_max = max(cur_max, ln)
    if cur:
        batches.append(cur)
    return batches


def sample_batches(examples: list[Example], batch_size: int, steps: int, seed: int):
    """Seeded epoch-wise shuffling: yields ``steps`` batches of ``batch_size`` examples."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order.extend(perm)
        batch, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in batch]
