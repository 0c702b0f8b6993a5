"""A catalogue of bad inputs run through every subcommand, as a new user would make them: each
must end in one line naming the file or key and the fix, exit 2, no traceback, and no output
that looks complete.

The commands run in this process (``mergelaws.cli.main``), so an exception that escapes the CLI
fails the test with its traceback. Model paths that look local are never sent to a hub
(HF_HUB_OFFLINE is set, so a slip would fail fast instead of waiting on the network).
"""

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergelaws import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _put(f: dict, name: str, path: Path) -> Path:
    f[name] = path
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, and a few good ones to pair them with."""
    d = tmp_path_factory.mktemp("bad")
    f = {"dir": d / "a_directory", "missing": d / "missing.yaml", "empty": d / "empty.yaml"}
    f["dir"].mkdir()
    f["empty"].write_text("")
    _put(f, "corrupt_yaml", d / "corrupt.yaml").write_text("domains: {a: [1, 2\nbases: :\n")
    _put(f, "binary", d / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    good = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    good["results"] = str(d / "results")
    for dom in good["domains"].values():
        for split in ("train", "eval"):
            dom[split] = str(ROOT / dom[split])
    for base in good["bases"].values():
        base["model"] = str(ROOT / base["model"])
    _put(f, "good", d / "good.yaml").write_text(yaml.safe_dump(good))
    _put(f, "unknown_key", d / "unknown_key.yaml").write_text(yaml.safe_dump({**good, "sweeep": {}}))
    _put(f, "wrong_type", d / "wrong_type.yaml").write_text(yaml.safe_dump({**good, "seed": "zero"}))
    _put(f, "duplicate_key", d / "dup.yaml").write_text("seed: 1\nseed: 2\n" + yaml.safe_dump(good))
    nobase = {**good, "bases": {"xs": {"model": str(d / "no_weights")}}}
    (d / "no_weights").mkdir()
    shutil.copy(ROOT / "data/bases/xs/config.json", d / "no_weights" / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ROOT / "data/bases/xs" / name, d / "no_weights" / name)
    _put(f, "base_without_weights", d / "nobase.yaml").write_text(yaml.safe_dump(nobase))
    f["model_without_weights"] = d / "no_weights"
    f["config_only_dir"] = d / "config_only"
    f["config_only_dir"].mkdir()
    (f["config_only_dir"] / "config.json").write_text("{}")
    # tables
    _put(f, "corrupt_parquet", d / "losses.parquet").write_bytes(b"PAR1 this is not parquet at all")
    _put(f, "csv_wrong_columns", d / "losses.csv").write_text("a,b\n1,2\n")
    pd.DataFrame({"size": ["xs"], "loss": [1.0]}).to_parquet(f.setdefault("parquet_wrong_columns",
                                                                         d / "wrong.parquet"))
    _put(f, "empty_table", d / "empty.parquet").write_bytes(b"")
    _put(f, "corrupt_json", d / "fits.json").write_text("{not json")
    _put(f, "json_wrong_keys", d / "other.json").write_text('{"something": 1}')
    # data
    _put(f, "corrupt_jsonl", d / "data.jsonl").write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with gzip.open(f.setdefault("jsonl_no_fields", d / "nofields.jsonl.gz"), "wt") as fh:
        fh.write(json.dumps({"question": "a", "answer": "b"}) + "\n")
    _put(f, "corrupt_gz", d / "data.jsonl.gz").write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    _put(f, "not_gguf", d / "model.gguf").write_bytes(b"not a gguf file")
    _put(f, "merge_unknown_method", d / "merge.yml").write_text(yaml.safe_dump(
        {"merge_method": "frankenmerge", "base_model": str(ROOT / "data/bases/xs"),
         "models": [{"model": str(ROOT / "data/bases/s")}]}))
    _put(f, "merge_missing_base", d / "merge2.yml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "base_model": str(d / "nowhere"), "models": [{"model": str(d / "nowhere2")}]}))
    from synthetic import synthetic_losses

    synthetic_losses(["a", "b", "c"], per_k=2).to_parquet(f.setdefault("good_losses", d / "good.parquet"))
    f["out"] = d / "out"
    return f


def _sweep_args(cfg, out):
    return ["sweep", "--config", str(cfg), "--size", "xs", "--method", "average", "--out", str(out)]


CONFIG_CASES = ["missing", "empty", "dir", "corrupt_yaml", "binary", "unknown_key", "wrong_type", "duplicate_key"]


def _catalogue(f):
    """(case id, argv, output path that must not exist afterwards)."""
    out = f["out"]
    cases = []
    for c in CONFIG_CASES:
        cfg = str(f[c])
        cases += [
            (f"validate/{c}", ["validate", "--config", cfg], None),
            (f"subsets/{c}", ["subsets", "--config", cfg], None),
            (f"tokenizer/{c}", ["tokenizer", "--config", cfg, "--out", str(out / "tok")], out / "tok"),
            (f"train/{c}", ["train", "--config", cfg, "--size", "xs", "--domain", "code", "--out",
                            str(out / "expert")], out / "expert"),
            (f"sweep/{c}", _sweep_args(cfg, out / "sweep.parquet"), out / "sweep.parquet"),
            (f"figures/{c}", ["figures", "--config", cfg, "--losses", str(f["corrupt_parquet"]), "--fits",
                              str(f["corrupt_json"]), "--out", str(out / "figs")], out / "figs"),
        ]
    cases += [
        ("train/base_without_weights", ["train", "--config", str(f["base_without_weights"]), "--size", "xs",
                                        "--domain", "code", "--out", str(out / "expert")], out / "expert"),
        ("sweep/base_without_weights", _sweep_args(f["base_without_weights"], out / "sweep.parquet"),
         out / "sweep.parquet"),
    ]
    for c in ("missing", "dir", "empty_table", "corrupt_parquet", "csv_wrong_columns", "parquet_wrong_columns"):
        table = str(f[c])
        cases += [
            (f"fit/{c}", ["fit", table, "--out", str(out / "fits")], out / "fits" / "fits.json"),
            (f"plan/{c}", ["plan", table, "--out", str(out / "plan")], out / "plan" / "plan.md"),
            (f"figures/{c}", ["figures", "--config", str(f["good"]), "--losses", table, "--fits",
                              str(f["corrupt_json"]), "--out", str(out / "figs")], out / "figs"),
            (f"aggregate/{c}", ["aggregate", table, "--out", str(out / "losses.parquet")], out / "losses.parquet"),
        ]
    for c in ("missing", "dir", "corrupt_json", "json_wrong_keys"):
        cases.append((f"plan/fits_{c}", ["plan", str(f["good_losses"]), "--fits", str(f[c]),
                                         "--out", str(out / "plan")], out / "plan" / "plan.md"))
    data = str(ROOT / "data/domains/quotes/eval.jsonl.gz")
    for c in ("missing", "dir", "model_without_weights", "config_only_dir", "not_gguf"):
        model = str(f[c]) if c != "missing" else str(out / "no" / "such" / "model")
        cases.append((f"eval/model_{c}", ["eval", "--model", model, "--data", data, "--out",
                                          str(out / "eval.json")], out / "eval.json"))
    for c in ("missing", "dir", "corrupt_jsonl", "jsonl_no_fields", "empty", "binary", "corrupt_gz"):
        cases.append((f"eval/data_{c}", ["eval", "--model", str(ROOT / "data/bases/xs"), "--data", str(f[c]),
                                         "--out", str(out / "eval.json")], out / "eval.json"))
    for c in ("missing", "dir", "empty", "corrupt_yaml", "merge_unknown_method", "merge_missing_base"):
        cases.append((f"merge/{c}", ["merge", str(f[c]), str(out / "merged")], out / "merged"))
    for c in ("missing", "dir", "not_gguf"):
        cases.append((f"convert/{c}", ["convert", "--gguf", str(f[c]), "--out", str(out / "conv")], out / "conv"))
    return cases


def _ids():
    fake = {k: Path(k) for k in ["dir", "missing", "empty", "corrupt_yaml", "binary", "good", "unknown_key",
                                 "wrong_type", "duplicate_key", "base_without_weights", "model_without_weights",
                                 "config_only_dir", "corrupt_parquet", "csv_wrong_columns",
                                 "parquet_wrong_columns", "empty_table", "corrupt_json", "json_wrong_keys",
                                 "corrupt_jsonl", "jsonl_no_fields", "corrupt_gz", "not_gguf", "merge_unknown_method",
                                 "merge_missing_base", "good_losses", "out"]}
    return [c[0] for c in _catalogue(fake)]


@pytest.mark.parametrize("case", _ids())
def test_bad_input_gives_one_line_exit_2_and_no_output(case, files, capsys):
    argv, out = next((a, o) for c, a, o in _catalogue(files) if c == case)
    rc = cli.main(argv)  # an escaping exception fails the test with its traceback
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"mergelaws {argv[0]}: error: ")]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    assert len(errors[0]) < 2100
    if out is not None:
        assert not Path(out).exists(), f"{out} was left behind"


def test_the_catalogue_covers_every_subcommand_that_reads_input():
    covered = {c.split("/")[0] for c in _ids()}
    assert covered >= {"validate", "subsets", "tokenizer", "train", "sweep", "aggregate", "fit", "plan",
                       "figures", "eval", "merge", "convert"}
    assert len(_ids()) >= 80
