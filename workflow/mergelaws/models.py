"""Hugging Face model directories: tiny-base configs, tokenizer, load/save, task vectors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mergelaws.errors import ModelError, one_line  # noqa: F401  (raised here, caught by the CLI)
from mergelaws.io import atomic_path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: The tiny bases' own chat template (shipped as chat_template.jinja beside their tokenizer):
#: ``<|user|>{prompt}<|assistant|>{response}<|endoftext|>``; a system turn, if any, is a plain first
#: line. Real models bring their own; mergelaws.data renders every example through the template.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>' + message['content'] + '<|endoftext|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)




def quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars would flood job logs


# ---- tokenizer -----------------------------------------------------------------------------

def train_tokenizer(texts, vocab_size: int, out: str | Path):
    """Byte-level BPE trained on ``texts``, saved as a transformers tokenizer in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 pad_token="<|pad|>", unk_token=None, model_max_length=4096,
                                 additional_special_tokens=["<|user|>", "<|assistant|>"])
    hf.chat_template = TINY_CHAT_TEMPLATE
    with atomic_path(out, is_dir=True) as tmp:
        hf.save_pretrained(tmp)
    return hf


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    local = check_model_source(path)
    if local and not any((Path(path) / n).exists() for n in
                         ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        what = "is not a Hugging Face model directory (no config.json" if not (Path(path) / "config.json").exists() \
            else "has no tokenizer (no tokenizer.json"
        raise ModelError(f"model directory {path} {what} or tokenizer_config.json); pass a model directory, or "
                         f"copy the base model's tokenizer files into it")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        if not local:
            raise ModelError(hub_message(path, exc)) from None
        raise ModelError(f"model directory {path}: its tokenizer could not be loaded ({one_line(exc)}); copy "
                         f"the base model's tokenizer files into it again") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt",
                                                     "chat_template.jinja"):
            shutil.copy2(Path(src) / name, Path(dst) / name)


# ---- tiny bases ----------------------------------------------------------------------------

def tiny_config(spec: dict, tokenizer):
    """A standard transformers causal-LM config (Llama or Qwen2) from a base spec in config.yaml."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.get("arch", "llama")]
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_heads"],
        max_position_embeddings=spec.get("max_position_embeddings", 512),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)


# ---- load / save ---------------------------------------------------------------------------

def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def bin_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("pytorch_model*.bin"))


def check_model_source(path: str | Path) -> bool:
    """True for a local directory, False for a hub id (``org/name`` with no such directory). A
    path that is neither (it does not exist, or it is a file) is refused here, so that it is
    never sent to a hub as an id."""
    from mergelaws.grid import looks_like_hub_id

    p = Path(path)
    if p.is_dir():
        return True
    if p.exists():
        raise ModelError(f"model path {p} is a file, not a model directory; pass the directory that holds "
                         f"config.json, the safetensors weights and the tokenizer")
    if looks_like_hub_id(str(path)):
        return False
    raise ModelError(f"model directory {p} does not exist; check the path (a hub id is written org/name)")


def hub_message(path, exc) -> str:
    return (f"{path} is not a local directory, and as a hub model id it could not be loaded ({one_line(exc, 200)}); "
            f"pass a local model directory, or run where the hub (or its cache) is reachable")


def check_model_dir(path: str | Path, allow_bin: bool = False) -> str:
    """Check a local model directory; returns the weights format to load ('safetensors' or 'bin')."""
    path = Path(path)
    if not check_model_source(path):
        return "safetensors"  # a hub id; transformers reports its own errors
    if not (path / "config.json").exists():
        raise ModelError(f"model directory {path} has no config.json; it is not a Hugging Face model "
                         f"directory (was it copied completely?)")
    if any(p.suffix == ".safetensors" for p in path.iterdir()):
        return "safetensors"
    if bin_files(path) and allow_bin:
        return "bin"
    if bin_files(path):
        raise ModelError(f"model directory {path} has only pickle (.bin) weights; mergelaws loads safetensors "
                         f"by default. Convert them (transformers' save_pretrained(..., safe_serialization=True)) "
                         f"or, if you trust the file, opt in with `allow_bin_checkpoints: true` in the config "
                         f"(or --allow-bin): they are then read with torch.load(weights_only=True)")
    raise ModelError(f"model directory {path} has no *.safetensors weights; mergelaws loads safetensors "
                     f"only (convert .bin checkpoints with transformers' save_pretrained)")


def load_bin_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of pytorch_model*.bin files, unpickled with ``weights_only=True`` only: a file that
    holds anything but tensors and plain containers is refused, never executed."""
    state = {}
    for f in bin_files(path):
        try:
            part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError and friends
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{f} is not a plain tensor checkpoint and was not loaded ({first[:200]}); "
                             f"torch.load(weights_only=True) refuses code in pickles: convert it with a trusted "
                             f"tool or get safetensors weights") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ModelError(f"{f} does not hold a state dict of tensors; it is not a model checkpoint")
        state.update(part)
    return state


def _load_bin_model(path: Path, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_bin_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if getattr(config, "tie_word_embeddings", False) and n.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ModelError(f"model directory {path}: its .bin weights do not match config.json (missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.to(resolve_dtype(dtype)).eval()


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu", allow_bin: bool = False):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if check_model_dir(path, allow_bin) == "bin":
        return _load_bin_model(Path(path), dtype).to(resolve_device(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if not Path(path).is_dir():
            raise ModelError(hub_message(path, exc)) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model directory {path} could not be loaded ({first}); its weights are truncated or "
                         f"corrupt: copy it again or delete it so the workflow rebuilds it") from None
    return model.to(resolve_device(device))


def save_model(model, out: str | Path, *, tokenizer_from: str | Path | None = None, tokenizer=None,
               extra_files: dict[str, dict] | None = None) -> None:
    """Save a HF model directory atomically (temp dir in the same parent, then rename)."""
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_from is not None and Path(tokenizer_from).is_dir():
            copy_tokenizer(tokenizer_from, tmp)
        for name, obj in (extra_files or {}).items():
            (Path(tmp) / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def storage_dtype(path: str | Path) -> str:
    """The dtype a model directory stores its floating-point weights in ('float32', 'bfloat16' or
    'float16'), from its safetensors headers (no weights read), else its config's dtype."""
    path = Path(path)
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and meta.get("dtype") in names:
                return names[meta["dtype"]]
    if path.is_dir() and (path / "config.json").exists():
        conf = json.loads((path / "config.json").read_text())
        dt = conf.get("dtype") or conf.get("torch_dtype")
        if dt in names.values():
            return dt
    return "float32"


def count_params(model) -> int:
    """Parameters counted once (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def float_state(model) -> dict[str, torch.Tensor]:
    """The model's unique floating-point parameters by name (tied weights once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        out[name] = p
    return out


# An expert whose vocabulary grew (rows appended to embed_tokens / lm_head, e.g. special tokens
# added at fine-tuning) is merged as mergekit merges it: mergekit's
# merge_methods/generalized_task_arithmetic.py cuts an embedding tensor of another shape to the
# base's (x[: base.shape[0], : base.shape[1]]) before forming its task vector, and with
# `tokenizer_source: base` tokenizer/build.py + tokenizer/embed.py map every model's rows onto
# the base's vocabulary by token, dropping tokens the base lacks; for an expert whose tokenizer is
# the base's plus appended tokens both keep exactly its first rows. So rows beyond the base's
# vocabulary are cut and the merged model keeps the base's vocabulary and tokenizer. mergekit
# skips (with a warning) any other tensor of another shape; here that is an error.


def vocab_tensors(model) -> set[str]:
    """Names (as in float_state) of the model's input and output embedding matrices: the tensors
    whose rows are the vocabulary."""
    ids = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, get)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    return {n for n, p in float_state(model).items() if id(p) in ids}


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def check_configs(base_config, expert_config, expert_path: str | Path) -> None:
    """Architecture (model_type, architectures) and tied embeddings of an expert's config must be
    its base's: a one-line ModelError naming the expert, the key and both values."""
    def arch(c):
        return getattr(c, "architectures", None) or None

    checks = [("model_type", getattr(base_config, "model_type", None), getattr(expert_config, "model_type", None))]
    if arch(base_config) and arch(expert_config):
        checks.append(("architectures", list(arch(base_config)), list(arch(expert_config))))
    checks.append(("tie_word_embeddings", getattr(_text_config(base_config), "tie_word_embeddings", None),
                   getattr(_text_config(expert_config), "tie_word_embeddings", None)))
    for key, b, e in checks:
        if b != e:
            raise ModelError(f"expert {expert_path} has {key} = {e!r} in its config.json but its base has {b!r}; "
                             f"experts must share their base's architecture and tied embeddings")


def check_shapes(base_shapes: dict[str, tuple[int, ...]], expert_shapes: dict[str, tuple[int, ...]],
                 expert_path: str | Path, vocab: set[str] = frozenset(),
                 allow_vocab_growth: bool = False) -> dict[str, int]:
    """Tensor names and shapes of an expert against its base's (floating tensors). Returns the
    rows to cut per tensor: a tensor in ``vocab`` with more rows than the base's (and the same
    other dims) when ``allow_vocab_growth`` (see the note above on mergekit); any other mismatch is
    a one-line ModelError naming the expert, the tensor and both shapes."""
    missing, extra = sorted(set(base_shapes) - set(expert_shapes)), sorted(set(expert_shapes) - set(base_shapes))
    if missing or extra:
        differ = (f"missing {missing[:3]}" if missing else "") + (", " if missing and extra else "") \
            + (f"extra {extra[:3]}" if extra else "")
        raise ModelError(f"expert {expert_path} does not match its base's parameters ({differ}); "
                         f"was it fine-tuned from this base?")
    cut = {}
    for name, b in base_shapes.items():
        e = tuple(expert_shapes[name])
        if e == tuple(b):
            continue
        if allow_vocab_growth and name in vocab and len(e) == len(b) and e[1:] == tuple(b[1:]) and e[0] > b[0]:
            cut[name] = e[0] - b[0]
            continue
        raise ModelError(f"expert {expert_path} has shape {e} for {name} but the base has {tuple(b)}; "
                         f"was it fine-tuned from this base?")
    return cut


def check_compatible(base, expert, expert_path: str | Path, *, allow_vocab_growth: bool = False) -> dict[str, int]:
    """An expert must have its base's architecture (config model_type / architectures), tied
    embeddings (config tie_word_embeddings), parameter names and shapes. With
    ``allow_vocab_growth``, embedding matrices with extra vocabulary rows are accepted: returns
    {tensor name: rows beyond the base's} for the merge to cut (see :func:`check_shapes`)."""
    check_configs(base.config, expert.config, expert_path)
    shapes = {n: tuple(p.shape) for n, p in float_state(expert).items()}
    return check_shapes({n: tuple(p.shape) for n, p in float_state(base).items()}, shapes, expert_path,
                        vocab_tensors(base), allow_vocab_growth)


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the floating tensors in a model directory's safetensors files, from their
    headers only (safetensors.safe_open; no weight is read)."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                sl = sf.get_slice(key)
                if sl.get_dtype().startswith(("F", "BF")):
                    shapes[key] = tuple(sl.get_shape())
    return shapes


def check_expert_files(base, expert_path: str | Path, *, base_file_keys=(),
                       allow_vocab_growth: bool = True) -> dict[str, int]:
    """:func:`check_compatible` from a local expert directory's config.json and safetensors
    headers (no weight loaded), against the loaded ``base``. Stored tensors that are no parameter
    of their own are ignored: a tied model's output embedding (transformers ties it away on
    loading), rotary ``inv_freq`` buffers, and any name the base's own files (``base_file_keys``)
    hold too."""
    from transformers import AutoConfig

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(expert_path))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"expert {expert_path}: its config.json could not be read ({first[:200]})") from None
    check_configs(base.config, config, expert_path)
    base_shapes = {n: tuple(p.shape) for n, p in float_state(base).items()}
    shapes = safetensors_shapes(expert_path)
    aliases = {n for n, _ in base.named_parameters(remove_duplicate=False)} - set(base_shapes)
    for name in list(shapes):
        if name not in base_shapes and (name in aliases or name in base_file_keys or name.endswith(".inv_freq")):
            del shapes[name]
    return check_shapes(base_shapes, shapes, expert_path, vocab_tensors(base), allow_vocab_growth)


def vocab_cut_message(expert_path: str | Path, cut: dict[str, int], base_rows: dict[str, int]) -> str:
    """The one log line for an expert whose extra vocabulary rows are cut."""
    rows = max(cut.values())
    where = ", ".join(f"{n} ({base_rows[n] + r} -> {base_rows[n]} rows)" for n, r in sorted(cut.items()))
    return (f"expert {expert_path}: its vocabulary has {rows} more rows than the base's; {rows} rows cut from "
            f"{where}: the merged model keeps the base's vocabulary (as mergekit with tokenizer_source: base)")
