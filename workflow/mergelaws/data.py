"""Domain corpora -> tokenized examples with response-only labels; length-bucketed batches.

One formatting path for every model, in training, evaluation and the OpenRLHF backend: an
example is a conversation rendered by the **tokenizer's own chat template** — an optional
system turn (``system_prompt`` in the config; the paper's "You are a helpful assistant." by
default, ``null`` for the template's own default), the user turn (the prompt) and the assistant
turn (the response). The loss is on exactly the assistant turn's tokens through its end-of-turn
token: the generation prompt (system + user + the template's assistant header, rendered with
``add_generation_prompt``) and the whole conversation are rendered; the first must be the start of
the second. The prompt ids are the generation prompt tokenized, and the targets are the rest of the
conversation tokenized on its own — the tokens a model generates after that prompt — up to and
including the last special token the template closes the turn with (``<|im_end|>`` for ChatML,
``<|eot_id|>`` for Llama 3); what the template adds after it (ChatML's newline) is not part of the
example. Tokenizing the two parts apart keeps the boundary exact: tokenizing the whole text would
fuse a response's leading spaces (indented code) with ChatML's newline into one token that
belongs to neither part (2,006 of the 18,000 shipped training examples on SmolLM2's tokenizer);
elsewhere the two ways give the same ids.

No template is ever invented for a model. The tiny bases ship a small chat template of their own
in their tokenizer files (``models.TINY_CHAT_TEMPLATE``: ``<|user|>{prompt}<|assistant|>
{response}<|endoftext|>``, a system turn as a plain first line). A tokenizer with no chat template
gets the prompt, a newline and the response joined as plain text, then the eos token, with the
loss on the response and eos; it has no place for a system prompt, which is then not used.

Truncation rule (documented, counted): an example longer than ``max_len`` tokens keeps at
most ``max_len // 2`` prompt tokens (the prompt's end, nearest the response) and fills the rest
with the response's beginning. An example left with no response token is skipped and counted.
"""

from __future__ import annotations

import gzip
import zlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from mergelaws.errors import DataError  # noqa: F401  (raised here and re-exported)

IGNORE = -100
#: The paper's system prompt for training and evaluation; config ``system_prompt``.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."




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
    if not path.is_file():
        raise DataError(f"data file {path} is not a file (a directory?); give the path of a JSONL(.gz) file")
    pairs: list[tuple[str, str]] = []
    try:
        _read_jsonl(path, pairs, prompt_field, response_field, limit)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:  # a corrupt .gz, a binary file
        raise DataError(f"data file {path} could not be read as UTF-8 JSONL{' (gzip)' if path.suffix == '.gz' else ''} "
                        f"({type(exc).__name__}); give a JSONL(.gz) file of prompt/response objects") from None
    if not pairs:
        raise DataError(f"data file {path} holds no examples; a domain needs at least one prompt/response pair")
    return pairs


def _read_jsonl(path: Path, pairs: list, prompt_field: str, response_field: str, limit: int | None) -> None:
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


def conversation(prompt: str, response: str | None = None, system: str | None = None) -> list[dict]:
    """The messages of one example: [system], user, [assistant]."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (eos, pad, role markers such as <|im_end|>)."""
    out = set(tokenizer.all_special_ids)
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            out.add(int(i))
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[str, str]:
    """(generation prompt text, whole conversation text) through the tokenizer's chat template."""
    msgs = conversation(prompt, response, system)
    head = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    return head, full


def split_ids(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of one example before truncation; see the module docstring."""
    if not has_chat_template(tokenizer):
        p_ids = _ids(tokenizer, prompt + "\n")
        return p_ids, _ids(tokenizer, response) + [tokenizer.eos_token_id]
    head, full = render(tokenizer, prompt, response, system)
    if not full.startswith(head):
        raise DataError(f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '?')} renders the "
                        f"generation prompt differently from the start of the whole conversation, so the "
                        f"assistant turn cannot be located; use a template whose generation prompt is a prefix "
                        f"of the rendered conversation")
    # the assistant turn is tokenized after the tokenized generation prompt, as a model meets it when
    # it generates: no token merges across the boundary (a response starting with spaces would
    # otherwise fuse them with ChatML's newline into one token that belongs to neither part)
    p_ids, r_ids = _ids(tokenizer, head), _ids(tokenizer, full[len(head):])
    special = special_ids(tokenizer)
    ends = [i for i, t in enumerate(r_ids) if t in special]
    if ends:  # through the end-of-turn token; what the template adds after it is not trained on
        r_ids = r_ids[:ends[-1] + 1]
    return p_ids, r_ids


def encode_pair(tokenizer, prompt: str, response: str, max_len: int,
                system: str | None = None) -> tuple[Example | None, bool]:
    """Tokenize one pair with response-only labels; returns (example or None if empty, truncated)."""
    p_ids, r_ids = split_ids(tokenizer, prompt, response, system)
    truncated = False
    if len(p_ids) + len(r_ids) > max_len:
        truncated = True
        keep_p = min(len(p_ids), max_len // 2)
        p_ids = p_ids[len(p_ids) - keep_p:]
        r_ids = r_ids[: max_len - keep_p]
    if not r_ids:
        return None, truncated
    return Example(p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids), truncated


def encode_pairs(tokenizer, pairs, max_len: int, system: str | None = None) -> Encoded:
    out = Encoded([])
    for prompt, response in pairs:
        ex, trunc = encode_pair(tokenizer, prompt, response, max_len, system)
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
    enc = encode_pairs(tokenizer, pairs, max_len, system=cfg.get("system_prompt"))
    if not enc.examples:
        raise DataError(f"domain '{domain}' ({spec[split]}) has no usable {split} example after "
                        f"truncation to {max_len} tokens; raise max_len or check the responses")
    return enc


# ---- batching ------------------------------------------------------------------------------

def pad_batch(examples: list[Example], pad_id: int, length: int | None = None):
    """Right-pad a list of examples into (input_ids, attention_mask, labels) tensors, to the
    longest example or to ``length`` (a fixed padding, as the paper's eval loop does)."""
    import torch

    n = length if length is not None else max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    lab = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        m = len(e)
        ids[i, :m] = torch.tensor(e.input_ids)
        att[i, :m] = 1
        lab[i, :m] = torch.tensor(e.labels)
    return ids, att, lab


#: evaluation cuts a length-sorted batch where padding would exceed this share of its tokens: a
#: domain of a few examples of spread-out lengths would otherwise share one batch padded to its
#: longest (SmolLM2, 16 examples per domain: 24,240 positions for 15,810 tokens; with the cut
#: 16,576, and one merge's evaluation 62-69 s -> 43-44 s on one CPU thread)
MAX_WASTE = 0.1


def length_batches(examples: list[Example], batch_tokens: int, max_waste: float | None = None) -> list[list[Example]]:
    """Sort by length and cut into batches whose padded size stays within ``batch_tokens``.

    Sequences are never padded to a fixed max length, only to the longest in their batch,
    which (being sorted) is close to the others. ``max_waste``: also cut where padding would make
    the batch more than (1 + max_waste) x its tokens (for a few examples of spread-out lengths,
    which would otherwise share one batch padded to the longest).
    """
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]), i))
    batches, cur, cur_max, cur_sum = [], [], 0, 0
    for i in order:
        ln = len(examples[i])
        padded = max(cur_max, ln) * (len(cur) + 1)
        if cur and (padded > batch_tokens or (max_waste is not None and padded > (1 + max_waste) * (cur_sum + ln))):
            batches.append(cur)
            cur, cur_max, cur_sum = [], 0, 0
        cur.append(examples[i])
        cur_max = max(cur_max, ln)
        cur_sum += ln
    if cur:
        batches.append(cur)
    return batches


def eval_batches(examples: list[Example], batch_tokens: int) -> list[list[Example]]:
    """Every evaluation's batches (the sweep's, ``mergelaws eval``'s, ``mergelaws predict``'s):
    ``length_batches`` with padding kept within ``MAX_WASTE`` of each batch's tokens."""
    return length_batches(examples, batch_tokens, MAX_WASTE)


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
