import copy
import os
from pathlib import Path

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
