"""`mergelaws merge CONFIG.yml OUT_DIR`: merge Hugging Face checkpoints from a mergekit-format YAML.

The YAML is mergekit's (https://github.com/arcee-ai/mergekit)::

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert_a
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/expert_b
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}   # shared; also defaults for per-model keys
    dtype: float32
    tokenizer_source: base      # optional: base | a model path (union: mergekit-yaml)
    chat_template: chatml       # optional: chatml | llama3 | alpaca | mistral | auto | Jinja text

and the semantics are mergekit 0.1.5's, computed with the sparsification and combine
helpers of :mod:`mergelaws.merging` (the ones its registered methods use), in float32 whatever
the storage dtype. For every floating parameter tensor, with task vectors v_i = theta_i -
theta_0 and per-model weights w_i::

    s_i   = sparsify_i(v_i)                               (per method, below)
    u_i   = w_i * s_i
    mixed = sum_i u_i                                     (no consensus)
          = sum_i u_i [sign(u_i) == E],  E = +1 where sum_i u_i >= 0 else -1   (consensus)
    mixed /= sum_i w_i  (resp. sum_i w_i [agree_i]; 0 -> 1)   if normalize
    theta = theta_0 + lambda * mixed

| merge_method (alias) | sparsify                                | consensus | normalize | rescale | registry equivalent (equal weights)              |
|----------------------|-----------------------------------------|-----------|-----------|---------|--------------------------------------------------|
| average (linear)     | -                                       | -         | true      | -       | average (sum w_i theta_i / sum w_i)              |
| task_arithmetic      | -                                       | no        | false     | -       | task_arithmetic combine=sum, scale=lambda*w      |
| ties                 | top int(d*n) by abs(v) (sparsify.trim)  | yes       | true      | false   | ties density=d, scale=lambda (rounds half up)    |
| dare (dare_linear)   | DARE masks, p = 1 - density             | no        | false     | true    | dare rescale=none (rescale: false, normalize)    |
| dare_ties            | DARE masks, p = 1 - density             | yes       | false     | true    | dare_ties rescale=l1 (normalize: true)           |
| breadcrumbs          | drop top gamma, keep next density       | no        | false     | false   | breadcrumbs (normalize: true)                    |
| (breadcrumbs_ties)   | same                                    | yes       | false     | false   | -                                                |
| della                | MagPrune keep probs (density, epsilon)  | yes       | true      | true    | della rescale=l1                                 |
| (della_linear)       | same                                    | no        | false     | true    | -                                                |
| model_stock          | -  (theta_0 + t * mean v_i)             | -         | -         | -       | model_stock                                      |
| fr_merging (fourier) | FR-Merging's frequency filter, ratio 0.9| yes       | false     | -       | fr_merging weight=w, scale=lambda                |
| free_merging         | as fr_merging, + the task's expert      | yes       | false     | -       | free_merging (needs ``task``: ``--task DOMAIN``) |

A ``merge_method`` is a registry name (the method's ``mergekit=`` form in its ``register`` call
gives the sparsify, consensus and default normalize and rescale columns) or one of mergekit's
names in parentheses (:data:`mergelaws.merging.mergekit_config.ALIASES`: ``breadcrumbs_ties``
adds consensus; ``della_linear`` drops it and defaults normalize to false). ``fourier`` is the
FREE-Merging repository's mergekit fork's name for FR-Merging (its filter at the fork's fixed
high_ratio 0.9, the released mask; see :mod:`mergelaws.merging.fourier`); its ``FREE`` method
computes the same merge as released (an empty expert) and is not offered under that name.

``merge_method: free_merging`` (task-aware) is FR-Merging plus ONE model's lightweight expert
(its raw task vector's top ``expert_density`` = 0.01 entries by |v| per tensor, the registry's
default, added unscaled in float32 before the cast to ``dtype``): ``run_merge(..., task=i)``
with i the model's index under ``models`` (``mergelaws merge --task DOMAIN`` finds it by the
experts' domains). Without a task it stops (it would silently be FR-Merging); ``task`` with any
other method stops too.

mergekit's ``rescale: true`` is its L1 rescale (x ||v||_1 / ||m*v||_1 per model and tensor),
not DARE's 1/(1-p). ``linear`` with ``normalize: false`` gives sum_i w_i theta_i.

The TIES keep count is mergekit's ``int(density * numel)`` (its ``sparsify.magnitude``;
``merging.trim(..., keep_rounding="floor")``, where the registry's TIES rounds half up), at least
1 where mergekit stops with an assertion.

Tokenizer and embeddings, as mergekit's ``tokenizer/build.py`` and ``tokenizer/embed.py``:

* ``tokenizer_source`` absent: the base's tokenizer files are copied and every tensor must have
  the base's shape (mergekit: same).
* ``tokenizer_source: base``: the output vocabulary is the base tokenizer's, the output
  tokenizer the base's. Each model's embedding and output-head rows (``embed_tokens``,
  ``lm_head``, ... with the base's ``vocab_size`` rows) are gathered by token string from its
  own tokenizer before merging: an expert fine-tuned with added tokens has those rows cut; a
  base token the expert lacks takes the base's row. ``config.json`` gets ``vocab_size`` = the
  vocabulary's length (a base with padding rows beyond its tokenizer loses them, as in
  mergekit). A base tokenizer with tokens at ids >= its vocab_size (mergekit strips those from a
  BPE tokenizer) is rejected.
* ``tokenizer_source: PATH`` (a model directory or id): that tokenizer, as is, is the output's;
  rows are gathered the same way, and a token missing from a model takes mergekit's default:
  the one model that has it, else the base's row, else the mean over the models that have it
  (zero if none has it).
* ``tokenizer_source: union`` is rejected (it builds a new tokenizer with added tokens): run
  ``mergekit-yaml`` for union vocabularies. Explicit tokenizer_source needs a ``base_model``
  that is a local safetensors directory.

``chat_template`` (mergekit's ``_set_chat_template``): a name mergekit ships (``chatml``,
``llama3``, ``alpaca``, ``mistral``; written here as Jinja of our own that renders exactly as
mergekit's files; ``exaone`` is not built in), ``auto`` (the most common template, stripped,
among base_model and the models' tokenizers, ties to the first in YAML order, base first; none
found: the tokenizer is left as it is) or a literal Jinja template (>= 20 characters with a
``{``). It is written to ``chat_template.jinja`` and to ``tokenizer_config.json``, so
``AutoTokenizer.from_pretrained(OUT).chat_template`` returns it.

Deviations from mergekit (documented, small): entries tied
in |v| are ranked by flat index (mergekit: torch's unstable sort); mean rows for missing
tokens are summed base first, then in YAML order, and a tie in ``chat_template: auto`` goes to
the first (mergekit: set order); random masks come from a CPU
generator seeded per tensor with ``merging.tensor_seed(seed, "", name)`` (mergekit: torch's
global RNG, unseeded), so reruns are bit-identical. The base model is a merge member only if
it is also listed under ``models``, except with ``linear``, where (as in mergekit) a base_model
is one more member weighted by the shared ``parameters.weight`` (an error without one); linear
without base_model uses the first model as theta_0, the tokenizer and config source.

Not supported, rejected with an error naming the key: per-tensor parameter filters and
gradients (lists), slices, LoRA (``model+lora``), ``tokenizer_source: union`` and the
``tokenizer:`` mapping, the ``exaone`` template name, and any key not listed here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from mergelaws.io import atomic_path
from mergelaws.merging.checkpoint import CheckpointError, DictSource, SafetensorsSource, SafetensorsWriter, read_f32
from mergelaws.merging.fourier import RELEASED_RATIO, fr_filter_all
from mergelaws.merging.gta import combine_deltas
from mergelaws.merging.mergekit_config import (ALIASES, CHAT_TEMPLATES, DTYPES, MergePlan, MergeYamlError,
                                               load_config, merge_method_names, mergekit_form, parse_config)
from mergelaws.merging.mergekit_vocab import (VocabMap, load_tokenizer, resolve_chat_template, vocab_map,
                                              write_chat_template)
from mergelaws.merging.model import merge_deltas, tensor_seed
from mergelaws.merging.registry import get_method, resolve_params
from mergelaws.merging.sparsify import rescale_kept, sparsify_breadcrumbs, sparsify_dare, sparsify_della, trim

__all__ = ["MergeYamlError", "MergePlan", "ALIASES", "CHAT_TEMPLATES", "merge_method_names", "mergekit_form",
           "parse_config", "load_config", "merge_tensor", "merge_task_vectors", "merge_states", "run_merge",
           "run_merge_in_memory", "task_expert", "check_task"]


def merge_tensor(plan: MergePlan, base: torch.Tensor, experts: list[torch.Tensor], *, seed: int = 0,
                 task: int | None = None) -> torch.Tensor:
    """The merged float32 tensor for one parameter (``seed`` seeds the random masks)."""
    b = base.float()
    deltas = torch.empty((len(experts), *b.shape), dtype=torch.float32, device=b.device)
    for i, e in enumerate(experts):  # = torch.stack([e - b ...]) without the temporaries
        torch.sub(e.to(b.device).float(), b, out=deltas[i])
    return merge_task_vectors(plan, b, deltas, seed=seed, task=task)


def merge_task_vectors(plan: MergePlan, b: torch.Tensor, deltas: torch.Tensor, *, seed: int = 0,
                       inplace: bool = False, task: int | None = None) -> torch.Tensor:
    """The merged float32 tensor from the base tensor ``b`` (fp32) and the task vectors ``deltas``
    [k, ...] (fp32, contiguous); ``inplace``: ``deltas`` may be overwritten (sparsified in place);
    ``task``: a task-aware method's model index whose lightweight expert is added (fp32)."""
    if task is not None:  # free_merging: (theta_0 + merge) + e_task, e from the raw task vector
        e = task_expert(plan, deltas[task])
        return merge_task_vectors(plan, b, deltas, seed=seed, inplace=inplace).add_(e)
    form = get_method(plan.method).mergekit
    if plan.method == "model_stock":
        return b + merge_deltas("model_stock", deltas, {"filter_wise": plan.filter_wise})
    rescale = "l1" if plan.rescale else "none"
    pm = plan.per_model
    k = deltas.shape[0]
    if form.sparsify == "magnitude":
        sparse = deltas if inplace and rescale != "l1" else torch.empty_like(deltas)
        for i in range(k):  # the registry's per-tensor trim, one model at a time; mergekit's count
            trim(deltas[i:i + 1], pm["density"][i], None, None, out=sparse[i:i + 1], keep_rounding="floor")
            if rescale == "l1":
                sparse[i] = rescale_kept(deltas[i], sparse[i] != 0, 1.0, "l1")
    elif form.sparsify == "random":
        sparse = sparsify_dare(deltas, [1.0 - d for d in pm["density"]], rescale, seed)
    elif form.sparsify == "outliers":
        sparse = sparsify_breadcrumbs(deltas, pm["density"], pm["gamma"], rescale)
    elif form.sparsify == "della":
        sparse = sparsify_della(deltas, pm["density"], pm["epsilon"], rescale, seed)
    elif form.sparsify == "fourier":
        sparse = fr_filter_all(deltas, RELEASED_RATIO, True)
    else:
        sparse = deltas
    weights = torch.tensor(plan.weights, dtype=torch.float32)
    mixed = combine_deltas(sparse, weights, consensus=plan.consensus, normalize=plan.normalize)
    if plan.method == "average":  # mergekit's linear
        if plan.normalize:
            return b + mixed
        return b * float(weights.sum()) + mixed  # sum_i w_i theta_i
    if plan.lam != 1.0:
        mixed = mixed * plan.lam
    return b + mixed


def merge_states(plan: MergePlan, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], *,
                 seed: int = 0, task: int | None = None) -> dict[str, torch.Tensor]:
    """Merge whole float32 state dicts by ``plan``; tensor n seeded with tensor_seed(seed, "", n)."""
    return {n: merge_tensor(plan, b, [e[n] for e in experts], seed=tensor_seed(seed, "", n), task=task)
            for n, b in base.items()}


def task_expert(plan: MergePlan, v: torch.Tensor) -> torch.Tensor:
    """A task-aware method's lightweight expert of one raw task vector (fp32, zeros elsewhere)."""
    return get_method(plan.method).expert(v, **resolve_params(plan.method, {}))


def check_task(plan: MergePlan, task: int | None) -> None:
    """A task-aware method (free_merging) needs the task's model index; no other method takes one."""
    if get_method(plan.method).task_aware:
        if task is None:
            raise MergeYamlError(f"merge_method {plan.method!r} adds one task's lightweight expert: give the task "
                                 f"(mergelaws merge --task DOMAIN), or use merge_method: fr_merging")
        if not 0 <= task < len(plan.models):
            raise MergeYamlError(f"task = {task} is not a model index under models (0 to {len(plan.models) - 1})")
    elif task is not None:
        raise MergeYamlError(f"a task (--task) is only for task-aware methods (free_merging), not merge_method "
                             f"{plan.method!r}; drop it")


def run_merge(config: str | Path | dict, out: str | Path, *, seed: int = 0, device: str = "cpu",
              allow_bin: bool = False, log=print, task: int | None = None) -> MergePlan:
    """Merge the checkpoints of a mergekit YAML into the Hugging Face directory ``out`` (atomically).

    Tensor by tensor: each input's tensor is read from its safetensors file into a buffer reused
    for every tensor (the k task vectors are formed in place), merged, and written straight into
    the output file (header first), so the peak memory is about one tensor per input plus the
    output tensor and the method's temporaries, (2k + 4) x the largest tensor, whatever the
    model size (logged). Inputs that are not local
    safetensors directories (hub ids, .bin with --allow-bin) are loaded whole through
    transformers first (logged). ``task``: free_merging's task, the index of its model under
    ``models`` (see the module doc).
    """
    from mergelaws import models

    t0 = time.time()
    plan = parse_config(config) if isinstance(config, dict) else load_config(config)
    check_task(plan, task)
    device = models.resolve_device(device)
    base_dir = Path(plan.base_model)
    template = resolve_chat_template(plan, log)
    if not (base_dir.is_dir() and any(base_dir.glob("*.safetensors"))):
        if plan.tokenizer_source is not None:
            raise MergeYamlError(f"tokenizer_source = {plan.tokenizer_source!r} needs base_model as a local "
                                 f"safetensors directory, and {plan.base_model} is not; download or convert it "
                                 f"first, or run mergekit-yaml")
        return run_merge_in_memory(plan, out, seed=seed, device=device, allow_bin=allow_bin, log=log, t0=t0,
                                   template=template, task=task)
    paths = list(dict.fromkeys([plan.base_model, *plan.models]))
    sources = {p: _open_input(p, allow_bin, log) for p in paths}
    base = sources[plan.base_model]
    names = _merged_names(base_dir, base)
    vocab = vocab_map(plan, paths, base, names, log) if plan.tokenizer_source is not None else None
    for path in plan.models:
        _check_same_tensors(path, sources[path], base, names, vocab)
    out_dtype = DTYPES[plan.out_dtype] if plan.out_dtype is not None else torch.float32
    others = [n for n in base.keys() if n not in names and not base.dtype(n).is_floating_point]
    layout = {n: (out_dtype, vocab.shape(n, base) if vocab and n in vocab.names else base.shape(n))
              for n in names}
    layout.update({n: (base.dtype(n), base.shape(n)) for n in others})
    k = len(plan.models)
    largest = max((math.prod(layout[n][1]) for n in names), default=0)
    # buffers reused for every tensor: the base tensor (fp32) and the k task vectors, read in place
    base_buf = torch.empty(largest, dtype=torch.float32)
    deltas_buf = torch.empty(k * largest, dtype=torch.float32)
    t_merge = t_io = 0.0
    with atomic_path(out, is_dir=True) as tmp:
        writer = SafetensorsWriter(Path(tmp) / "model.safetensors", layout)
        for n in sorted(layout):
            t1 = time.perf_counter()
            if n in others:
                value = base.get(n)
            elif vocab is not None and n in vocab.names:  # rows gathered by token string, then merged
                deltas = deltas_buf[:k * math.prod(layout[n][1])].view(k, *layout[n][1])
                b = vocab.gather(n, sources, plan.models, deltas)
                if torch.device(device).type != "cpu":
                    b, deltas = b.to(device), deltas.to(device)
                value = merge_task_vectors(plan, b, deltas, seed=tensor_seed(seed, "", n), inplace=True, task=task)
                value = value.to(out_dtype)
            else:
                b = read_f32(base, n, base_buf)
                deltas = deltas_buf[:k * b.numel()].view(k, *b.shape)
                for i, m in enumerate(plan.models):
                    src = sources[m]
                    if src.dtype(n) == torch.float32:  # e - b, as merge_tensor, without a copy of e
                        src.read(n, deltas[i]).sub_(b)
                    else:
                        torch.sub(src.get(n), b, out=deltas[i])
                if torch.device(device).type != "cpu":
                    b, deltas = b.to(device), deltas.to(device)
                value = merge_task_vectors(plan, b, deltas, seed=tensor_seed(seed, "", n), inplace=True, task=task)
                value = value.to(out_dtype)
            t2 = time.perf_counter()
            writer.write(n, value.cpu())
            for src in sources.values():
                src.release(n)
            t_merge += t2 - t1
            t_io += time.perf_counter() - t2
        writer.close()
        _write_model_files(base_dir, Path(tmp), out_dtype, vocab_size=vocab.size if vocab else None,
                           tokenizer_from=vocab.tokenizer if vocab else None)
        if template is not None:
            write_chat_template(Path(tmp), template)
        record = {"mergelaws_merge": plan.describe(), "seed": seed, "config": plan.raw,
                  **({"task_model": plan.models[task]} if task is not None else {})}
        (Path(tmp) / "mergelaws_merge.json").write_text(
            json.dumps(json.loads(json.dumps(record, default=str)), indent=2, sort_keys=True) + "\n")
    read = sum(src.bytes_read for src in sources.values())
    log(f"merge {plan.method}: {k} models -> {out} in {time.time() - t0:.1f}s, tensor by tensor (read "
        f"{read / 1e9:.2f} GB from the safetensors files, wrote {writer.nbytes / 1e9:.2f} GB): merge {t_merge:.1f}s "
        f"incl. reading, write {t_io:.1f}s. Peak memory: one tensor per input plus the output tensor and the "
        f"method's temporaries, about (2k + 4) x the largest tensor = {(2 * k + 4) * largest * 4 / 1e9:.2f} GB "
        f"(k = {k}, largest {largest * 4 / 1e6:.1f} MB in fp32), whatever the model size")
    return plan


def _open_input(path: str, allow_bin: bool, log):
    """A memory-mapped reader for a local safetensors directory, else the model loaded through
    transformers (hub ids, .bin checkpoints) as a dict."""
    from mergelaws import models

    p = Path(path)
    if p.is_dir() and any(p.glob("*.safetensors")):
        try:
            return SafetensorsSource(p)
        except CheckpointError as exc:
            raise models.ModelError(f"model directory {p} could not be read ({exc}); its weights are truncated "
                                    f"or corrupt: copy it again") from None
    log(f"merge: {path} is not a local safetensors directory; loading it whole through transformers")
    model = models.load_model(path, "float32", "cpu", allow_bin=allow_bin)
    return DictSource({n: t.detach() for n, t in model.state_dict().items()})


def _merged_names(base_dir: Path, base) -> list[str]:
    """The base's floating tensors; an lm_head.weight stored beside the embeddings it is tied to
    (config.json tie_word_embeddings: true) is left out, as transformers' save_pretrained does."""
    names = [n for n in base.keys() if base.dtype(n).is_floating_point]
    try:
        cfg = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    if cfg.get("tie_word_embeddings") is True and "lm_head.weight" in names and len(names) > 1:
        names.remove("lm_head.weight")
    return names


def _check_same_tensors(path: str, src, base, names: list[str], vocab: VocabMap | None = None) -> None:
    from mergelaws import models

    missing = [n for n in names if n not in src]
    if missing:
        raise models.ModelError(f"model {path} does not match the base's parameters (no {missing[:3]}); was it "
                                f"fine-tuned from this base?")
    for n in names:
        if vocab is not None and n in vocab.names:
            vocab.check(path, n, src.shape(n), base.shape(n))
        elif tuple(src.shape(n)) != tuple(base.shape(n)):
            raise models.ModelError(f"model {path} has shape {tuple(src.shape(n))} for {n} but the base has "
                                    f"{tuple(base.shape(n))}; was it fine-tuned from this base?")


def _write_model_files(base_dir: Path, out: Path, dtype: torch.dtype, *, vocab_size: int | None = None,
                       tokenizer_from: str | None = None) -> None:
    """config.json (dtype set to the output's; ``vocab_size`` when given, as mergekit's
    _update_config_vocab), generation_config.json from the base, and the tokenizer: the base's
    files, or ``tokenizer_from``'s (a directory's files, else the tokenizer loaded and saved)."""
    from mergelaws import models

    cfg = json.loads((base_dir / "config.json").read_text())
    name = str(dtype).replace("torch.", "")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    if vocab_size is not None:
        target = cfg["text_config"] if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict) else cfg
        target["vocab_size"] = vocab_size
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").exists():
        (out / "generation_config.json").write_bytes((base_dir / "generation_config.json").read_bytes())
    if tokenizer_from is None or Path(tokenizer_from).resolve() == base_dir.resolve():
        models.copy_tokenizer(base_dir, out)
    elif Path(tokenizer_from).is_dir():
        models.copy_tokenizer(tokenizer_from, out)
    else:
        load_tokenizer(tokenizer_from).save_pretrained(str(out))


def run_merge_in_memory(plan: MergePlan, out, *, seed: int, device: str, allow_bin: bool, log, t0: float,
                        template: str | None = None, task: int | None = None) -> MergePlan:
    """The whole-model path, for a base that is not a local safetensors directory (a hub id or
    .bin weights): every model is loaded through transformers. ``template``: the chat template
    to write (from resolve_chat_template)."""
    from mergelaws import models

    model = models.load_model(plan.base_model, "float32", device, allow_bin=allow_bin)
    live = models.float_state(model)
    base_state = {n: p.detach().float().clone() for n, p in live.items()}
    experts = []
    for path in plan.models:
        em = models.load_model(path, "float32", "cpu", allow_bin=allow_bin)
        models.check_compatible(model, em, path)
        experts.append({n: p.detach().float().to(device) for n, p in models.float_state(em).items()})
        del em
    merged = merge_states(plan, base_state, experts, seed=seed, task=task)
    with torch.no_grad():
        for n, p in live.items():
            p.copy_(merged[n])
    if plan.out_dtype is not None:
        model = model.to(DTYPES[plan.out_dtype])
    model = model.to("cpu")
    record = {"mergelaws_merge": plan.describe(), "seed": seed, "config": plan.raw,
              **({"task_model": plan.models[task]} if task is not None else {})}
    tokenizer = None
    if template is not None and not Path(plan.base_model).is_dir():  # a hub id: its tokenizer carries the template
        tokenizer = load_tokenizer(plan.base_model)
        tokenizer.chat_template = template
    with atomic_path(out, is_dir=True) as tmp:  # as models.save_model, plus the chat template
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif Path(plan.base_model).is_dir():
            models.copy_tokenizer(plan.base_model, tmp)
            if template is not None:
                write_chat_template(Path(tmp), template)
        (Path(tmp) / "mergelaws_merge.json").write_text(
            json.dumps(json.loads(json.dumps(record, default=str)), indent=2, sort_keys=True) + "\n")
    log(f"merge {plan.method}: {len(plan.models)} models -> {out} in {time.time() - t0:.1f}s (loaded whole: the "
        f"base is not a local safetensors directory; peak memory about {len(plan.models) + 2} models in fp32)")
    return plan
