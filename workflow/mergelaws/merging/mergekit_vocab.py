"""``tokenizer_source`` and ``chat_template`` of ``mergelaws merge``, as mergekit's
``tokenizer/build.py``, ``tokenizer/embed.py`` and ``_set_chat_template``: the output vocabulary,
every model's embedding rows gathered by token string (:class:`VocabMap`), and the chat template
written with the output tokenizer. See :mod:`mergelaws.merging.mergekit` for the semantics."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelaws.merging.mergekit_config import CHAT_TEMPLATES, MergePlan, MergeYamlError

__all__ = ["EMBED_SUFFIXES", "load_tokenizer", "VocabMap", "vocab_map", "resolve_chat_template",
           "write_chat_template"]

# Names of the tensors with one row per token (mergekit's architectures mark them is_embed).
EMBED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight",
                  "word_embeddings.weight", "tok_embeddings.weight", "output.weight", "shared.weight",
                  "lm_head.decoder.weight", "lm_head.linear.weight", "vocab_projector.weight",
                  "output_layer.weight", "backbone.embeddings.weight")


def load_tokenizer(path: str):
    """The tokenizer of a model directory or hub id; a ModelError naming it if it cannot be loaded."""
    from transformers import AutoTokenizer

    from mergelaws import models

    models.quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise models.ModelError(f"the tokenizer of {path} could not be loaded ({first}); give a model directory "
                                f"with tokenizer files") from None


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(f.name.startswith("tokenizer") for f in p.iterdir())


def _config_vocab_size(path: str) -> int | None:
    """The ``vocab_size`` of a model's config (a text_config's for multimodal ones), None if absent."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError):
        return None
    size = getattr(cfg, "vocab_size", None)
    if size is None and hasattr(cfg, "get_text_config"):
        size = getattr(cfg.get_text_config(), "vocab_size", None)
    return int(size) if size is not None else None


@dataclass
class VocabMap:
    """Embedding rows by token string, for an explicit ``tokenizer_source`` (mergekit's
    PermutedEmbeddings): ``index[path][t]`` is the row of output token ``t`` in that model's
    tensors, -1 where the model lacks the token."""

    size: int  # output vocabulary length = rows of every vocab tensor
    names: list[str]  # the tensors with one row per token
    index: dict[str, torch.Tensor]  # model path -> int64 [size]; the base first
    base: str
    tokenizer: str  # where the output tokenizer comes from

    def shape(self, n: str, base) -> tuple[int, ...]:
        return (self.size, *base.shape(n)[1:])

    def check(self, path: str, n: str, shape, base_shape) -> None:
        from mergelaws import models

        need = int(self.index[path].max()) + 1 if self.size else 0
        if len(shape) != len(base_shape) or tuple(shape[1:]) != tuple(base_shape[1:]) or shape[0] < need:
            raise models.ModelError(f"model {path} has shape {tuple(shape)} for {n} but its tokenizer needs >= {need} "
                                    f"rows of {tuple(base_shape[1:])} (the base: {tuple(base_shape)}); was it "
                                    f"fine-tuned from this base?")

    def gather(self, n: str, sources: dict, models: list[str], deltas: torch.Tensor) -> torch.Tensor:
        """Tensor ``n`` with one row per output token: returns the base's (fp32) and writes the
        task vectors of ``models`` into ``deltas`` [k, size, ...]. A model's row is its own where
        it has the token, else mergekit's default: the one model that has it, else the base's row,
        else the mean over the models that have it (zeros if none has it). The base lacks a
        token only when the default is not its own row, so its tensor is the default itself."""
        width = tuple(sources[self.base].shape(n)[1:])
        total = torch.zeros((self.size, *width), dtype=torch.float32)
        count = torch.zeros(self.size, dtype=torch.float32)
        for p, idx in self.index.items():  # the base first
            have = idx >= 0
            total[have] += sources[p].get(n)[idx[have]].float()
            count += have
        b = total.div_(count.clamp_min(1).view(-1, *([1] * len(width))))
        base_idx = self.index[self.base]
        has = base_idx >= 0
        b[has] = sources[self.base].get(n)[base_idx[has]].float()
        for i, m in enumerate(models):
            idx = self.index[m]
            have = idx >= 0
            deltas[i].copy_(b)
            deltas[i][have] = sources[m].get(n)[idx[have]].float()
            deltas[i].sub_(b)
        return b


def vocab_map(plan: MergePlan, paths: list[str], base, names: list[str], log) -> VocabMap:
    """The output vocabulary and every model's rows for it (mergekit's tokenizer/build.py)."""
    from mergelaws import models

    base_tok = load_tokenizer(plan.base_model)
    base_vocab = dict(base_tok.get_vocab())
    base_size = _config_vocab_size(plan.base_model) or len(base_vocab)
    beyond = sum(1 for i in base_vocab.values() if i >= base_size)
    if beyond and plan.tokenizer_source == "base":  # for another source they are tokens the base lacks
        raise MergeYamlError(f"tokenizer_source = 'base': base_model {plan.base_model} has {beyond} tokenizer tokens "
                             f"at ids >= its vocab_size {base_size}; mergekit strips those from the tokenizer (run "
                             f"mergekit-yaml), or give a tokenizer_source whose tokenizer fits")
    if plan.tokenizer_source == "base":
        source, out_vocab = plan.base_model, base_vocab
    else:
        source = plan.tokenizer_source
        out_vocab = dict(load_tokenizer(source).get_vocab())
    size = len(out_vocab)
    if sorted(out_vocab.values()) != list(range(size)):
        raise MergeYamlError(f"tokenizer_source = {plan.tokenizer_source!r}: the tokenizer of {source} has ids "
                             f"that are not 0..{size - 1} (gaps or duplicates); give another tokenizer_source or "
                             f"run mergekit-yaml")
    tokens = [None] * size
    for tok, i in out_vocab.items():
        tokens[i] = tok
    vocab_names = [n for n in names if n.endswith(EMBED_SUFFIXES) and len(base.shape(n)) == 2
                   and base.shape(n)[0] == base_size]
    if not vocab_names:
        raise models.ModelError(f"tokenizer_source: no embedding tensor of base_model {plan.base_model} has its "
                                f"vocab_size {base_size} rows; drop tokenizer_source, or run mergekit-yaml")
    index = {}
    for p in paths:
        if p == plan.base_model:
            vocab, limit = base_vocab, base_size
        else:
            if _has_tokenizer(p) or not Path(p).is_dir():
                vocab = dict(load_tokenizer(p).get_vocab())
            else:  # as mergekit: a model without a tokenizer is assumed to share the base's
                log(f"merge: {p} has no tokenizer; assuming the base's vocabulary for its embedding rows")
                vocab = base_vocab
            limit = _config_vocab_size(p) or len(vocab)
        index[p] = torch.tensor([i if (i := vocab.get(t, -1)) < limit else -1 for t in tokens], dtype=torch.int64)
    moved = [p for p in paths if not torch.equal(index[p], torch.arange(size))]
    log(f"merge: tokenizer_source {plan.tokenizer_source}: {size} tokens from {source}; rows of "
        f"{', '.join(vocab_names)} taken by token string ({len(moved)} of {len(paths)} models with tokens "
        f"reordered or missing, the others cut to the first {size} rows"
        f"{'' if size == base_size else f'; vocab_size {base_size} -> {size}'})")
    return VocabMap(size=size, names=vocab_names, index=index, base=plan.base_model, tokenizer=source)


def resolve_chat_template(plan: MergePlan, log) -> str | None:
    """The chat template text to write, or None (none asked, or ``auto`` found none)."""
    value = plan.chat_template
    if value is None:
        return None
    target = plan.tokenizer_source if plan.tokenizer_source not in (None, "base") else plan.base_model
    if Path(target).is_dir() and not _has_tokenizer(target):
        raise MergeYamlError(f"chat_template is set but {target} has no tokenizer files to carry it; add the "
                             f"tokenizer, set tokenizer_source, or drop chat_template")
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value != "auto":
        return value
    found = []
    for p in dict.fromkeys([plan.base_model, *plan.models]):
        if Path(p).is_dir() and not _has_tokenizer(p):
            continue
        try:
            template = load_tokenizer(p).chat_template
        except (OSError, ValueError):
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    if not found:
        log("merge: chat_template auto: no input has a chat template; the tokenizer is left as it is")
        return None
    counts = Counter(found)
    best = max(counts.values())
    chosen = next(t for t in found if counts[t] == best)  # ties: the first in YAML order, base first
    log(f"merge: chat_template auto: the template of {best} of {len(found)} inputs with one")
    return chosen


def write_chat_template(out: Path, template: str) -> None:
    """``template`` as the output tokenizer's chat template: ``chat_template.jinja`` (which
    transformers >= 4.50 reads first) and the ``chat_template`` of tokenizer_config.json (older)."""
    (out / "chat_template.jinja").write_text(template)
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
