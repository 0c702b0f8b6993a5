"""Hugging Face model directories: tiny-base configs, tokenizer, load/save, task vectors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mergelaws.errors import ModelError  # noqa: F401  (raised here, caught by the CLI)
from mergelaws.io import atomic_path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")




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
    with atomic_path(out, is_dir=True) as tmp:
        hf.save_pretrained(tmp)
    return hf


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(path))
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


def check_model_dir(path: str | Path, allow_bin: bool = False) -> str:
    """Check a local model directory; returns the weights format to load ('safetensors' or 'bin')."""
    path = Path(path)
    if not path.is_dir():
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
            raise
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


def check_compatible(base, expert, expert_path: str | Path) -> None:
    """An expert must have its base's architecture, parameter names and shapes."""
    b, e = float_state(base), float_state(expert)
    if set(b) != set(e):
        missing = sorted(set(b) ^ set(e))[:3]
        raise ModelError(f"expert {expert_path} does not match its base's parameters (differs at {missing}); "
                         f"was it fine-tuned from this base?")
    for name in b:
        if b[name].shape != e[name].shape:
            raise ModelError(f"expert {expert_path} has shape {tuple(e[name].shape)} for {name} but the base has "
                             f"{tuple(b[name].shape)}; was it fine-tuned from this base?")
