import copy

import pytest

from mergelaws import config


def _bad(raw, mutate):
    cfg = copy.deepcopy(raw)
    mutate(cfg)
    with pytest.raises(config.ConfigError) as exc:
        config.validate(cfg)
    return str(exc.value)


def test_default_config_is_valid_and_filled(cfg):
    assert cfg["sweep"]["k"] == "all"
    assert cfg["eval"]["batch_tokens"] > 0
    # method defaults filled from the registry (the paper's Table 1)
    assert cfg["methods"]["dare"]["drop_rate"] == 0.2
    assert cfg["methods"]["task_arithmetic"]["scale"] == 0.8


def test_unknown_top_level_key_names_it_and_allowed(default_cfg_raw):
    msg = _bad(default_cfg_raw, lambda c: c.update(colour="red"))
    assert "'colour'" in msg and "allowed keys" in msg and "domains" in msg


def test_unknown_method_lists_methods(default_cfg_raw):
    msg = _bad(default_cfg_raw, lambda c: c["methods"].update(foo={}))
    assert "'foo'" in msg and "ties" in msg and "average" in msg


def test_wrong_type(default_cfg_raw):
    msg = _bad(default_cfg_raw, lambda c: c["train"].update(steps="many"))
    assert "train.steps" in msg and "type" in msg


def test_out_of_range_method_param(default_cfg_raw):
    msg = _bad(default_cfg_raw, lambda c: c["methods"].update(ties={"density": 1.5}))
    assert "density" in msg and "1.5" in msg


def test_k_larger_than_domains(default_cfg_raw):
    msg = _bad(default_cfg_raw, lambda c: c["sweep"].update(k=[1, 2, 12]))
    assert "sweep.k" in msg and "12" in msg


def test_enum_lists_choices(default_cfg_raw):
    msg = _bad(default_cfg_raw, lambda c: c["sweep"].update(sampler="random"))
    assert "sweep.sampler" in msg and "uniform" in msg and "orders" in msg


def test_zero_subsets(default_cfg_raw):
    msg = _bad(default_cfg_raw, lambda c: c["sweep"].update(subsets_per_k=0))
    assert "sweep.subsets_per_k" in msg


def test_schema_method_params_match_registry():
    from mergelaws import merging as merge

    defs = config.schema()["$defs"]
    assert set(config.schema()["properties"]["methods"]["properties"]) == set(merge.method_names())
    for name in merge.method_names():
        assert defs[f"method_{name}"] == merge.params_json_schema(name), name


def test_cli_reports_config_error(tmp_path, default_cfg_raw, capsys):
    import yaml

    from mergelaws import cli

    bad = copy.deepcopy(default_cfg_raw)
    bad["sweep"]["subsets_per_k"] = -3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert cli.main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "sweep.subsets_per_k" in err


def test_duplicate_domain_is_refused(tmp_path, root):
    text = (root / "config.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("quotes:"))
    bad = tmp_path / "dup.yaml"
    bad.write_text(text.replace(line, line + "\n" + line))
    with pytest.raises(config.ConfigError, match=r"dup.yaml: line \d+: key 'quotes' appears twice"):
        config.load(bad)


def test_snakefile_refuses_bad_config_with_the_message(tmp_path, root, default_cfg_raw):
    import json
    import subprocess
    import sys

    import yaml

    bad = copy.deepcopy(default_cfg_raw)
    bad["methods"]["ties"] = {"density": 0}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "-n",
                           "--directory", str(tmp_path), "--configfile", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "density" in proc.stdout + proc.stderr


def test_validation_without_method_resolution_needs_no_torch_and_checks_the_rest(default_cfg_raw, tmp_path):
    """fit/figures/plan validate with resolve_methods=False, without importing torch (envs/fit.yaml):
    the schema still fills the method defaults (generated from the registry) and the other
    semantic checks still apply."""
    import json
    import subprocess
    import sys

    import yaml

    raw = copy.deepcopy(default_cfg_raw)
    raw["methods"] = {"ties": {"density": 0.5}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = ("import sys, json; from mergelaws import config; "
            f"c = config.load({str(path)!r}, resolve_methods=False); "
            "print(json.dumps([c['methods'], 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    methods, torch_loaded = json.loads(out.stdout)
    assert not torch_loaded
    assert methods == config.validate(copy.deepcopy(raw))["methods"]
    raw["sweep"]["k"] = [1, 99]
    with pytest.raises(config.ConfigError, match="larger than the number of domains"):
        config.validate(raw, resolve_methods=False)
