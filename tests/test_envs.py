"""The conda environments (envs/*.yaml): pinned, consistent with pyproject.toml, and used for real
by `snakemake --software-deployment-method conda`, with tests/fake_conda.py standing in for the
conda executable (no conda channel is reachable here; see its docstring for what it does)."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
NOT_IN_JOB_ENVS = {"snakemake", "snakemake-executor-plugin-slurm"}  # jobs run snakemake from the main env


def _pip_pins(env: Path) -> dict[str, str]:
    spec = yaml.safe_load(env.read_text())
    pins = {}
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                req = Requirement(line)
                pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def _project_deps() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}


def test_there_is_an_env_per_rule_kind_each_with_its_post_deploy_install():
    assert {e.stem for e in ENVS} == {"mergelaws", "fit", "train-openrlhf"}
    for env in ENVS:
        deploy = env.with_suffix(".post-deploy.sh")
        assert deploy.exists(), f"{deploy} missing: the env would not contain mergelaws"
        text = deploy.read_text()
        assert '-e "$MERGELAWS_ROOT"' in text and "--no-deps" in text
        # conda reads a relative path from the env file's directory, and Snakemake creates envs
        # from a copy in .snakemake/conda/: the project must not be named by a relative path
        assert "-e .." not in env.read_text()


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.stem)
def test_pip_packages_are_pinned_to_versions_pyproject_allows(env):
    deps = _project_deps()
    pins = _pip_pins(env)
    assert pins
    for name, spec in pins.items():
        if name in {"packaging", "ninja", "psutil", "wheel"}:   # build helpers of flash-attn/deepspeed
            continue
        assert spec.startswith("==") and "*" not in spec, f"{env.name}: {name}{spec} is not an exact pin"
        if name in deps:
            assert deps[name].specifier.contains(spec[2:], prereleases=True), \
                f"{env.name}: {name}{spec} is outside pyproject's {deps[name]}"


def test_the_torch_envs_declare_every_runtime_dependency():
    needed = set(_project_deps()) - NOT_IN_JOB_ENVS
    for stem in ("mergelaws", "train-openrlhf"):
        missing = needed - set(_pip_pins(ROOT / "envs" / f"{stem}.yaml"))
        assert not missing, f"envs/{stem}.yaml lacks {sorted(missing)}"
    assert "torch" not in _pip_pins(ROOT / "envs" / "fit.yaml")
    train = _pip_pins(ROOT / "envs" / "train-openrlhf.yaml")
    assert train["transformers"] == "==5.15.0" and train["deepspeed"] == "==0.19.6"  # what OpenRLHF 0.11.2 pins


# ---- the workflow run through the envs ------------------------------------------------------

def _fake_conda(prefix: Path) -> Path:
    bin_dir = prefix / "bin"
    bin_dir.mkdir(parents=True)
    conda = bin_dir / "conda"
    conda.write_text(f"#!{sys.executable}\n" + (ROOT / "tests" / "fake_conda.py").read_text())
    conda.chmod(0o755)
    (bin_dir / "activate").write_text(
        '# sourced by Snakemake before each job: "source <prefix>/bin/activate ENV"\n'
        'export PATH="$1/bin:$PATH" CONDA_PREFIX="$1"\n'
        'echo "activate $1" >> "${FAKE_CONDA_LOG:-/dev/null}"\n')
    return bin_dir


@pytest.fixture(scope="module")
def conda_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("conda")
    d = ROOT / "data" / "domains"
    cfg = {
        "results": str(work / "results"),
        "seed": 5,
        "domains": {n: {"train": str(d / n / "train.jsonl.gz"), "eval": str(d / n / "eval.jsonl.gz")}
                    for n in ("code", "quotes", "arithmetic")},
        "tokenizer": {"path": str(ROOT / "data" / "tokenizer")},
        "bases": {"xs": {"model": str(ROOT / "data" / "bases" / "xs")},
                  "s": {"model": str(ROOT / "data" / "bases" / "s")}},
        "train": {"steps": 4, "batch_size": 2, "max_len": 48, "device": "cpu"},
        "methods": {"average": {}},
        "sweep": {"k": "all", "subsets_per_k": 2, "device": "cpu"},
        "eval": {"max_examples": 4, "max_len": 48},
        "fit": {"n_boot": 0},
        "resources": {"default": {"threads": 1}},
    }
    cfgfile = work / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    bin_dir = _fake_conda(work / "conda")
    log = work / "conda.log"
    # only the fake conda and the system on PATH: `mergelaws` exists nowhere but in the envs
    env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MERGELAWS_ROOT")},
           "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_CONDA_LOG": str(log)}
    assert shutil.which("mergelaws", path=env["PATH"]) is None
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(cfgfile), "--cores", "2", "--sdm", "conda"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return work, cfg, log.read_text().splitlines(), proc, cmd, env


def test_snakemake_creates_each_env_once_and_installs_the_checkout_into_it(conda_run):
    work, _, log, proc, _, _ = conda_run
    created = [line.split() for line in log if line.startswith("create ")]
    # backend torch: the train rule shares the torch env; fit/figures/plan use the small one
    assert len(created) == 2, log
    files = sorted(Path(f).read_text() for _, f, _ in created)
    assert files == sorted((ROOT / "envs" / n).read_text() for n in ("fit.yaml", "mergelaws.yaml"))
    for _, env_file, prefix in created:
        # Snakemake created it from a copy beside the env, not from envs/: why no relative paths
        assert Path(env_file).parent == work / ".snakemake" / "conda"
        mergelaws = Path(prefix) / "bin" / "mergelaws"
        assert mergelaws.exists(), f"the post-deploy script did not install mergelaws into {prefix}"
        out = subprocess.run([str(Path(prefix) / "bin" / "python"), "-c",
                              "import mergelaws, pathlib; print(pathlib.Path(mergelaws.__file__).parent)"],
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert out.stdout.strip() == str(ROOT / "workflow" / "mergelaws"), out.stderr  # editable: this checkout
    assert "Running post-deploy script" in proc.stderr


def test_every_job_ran_inside_its_env_and_the_table_is_complete(conda_run):
    work, cfg, log, proc, _, _ = conda_run
    prefixes = {Path(line.split()[2]).name: line.split()[2] for line in log if line.startswith("create ")}
    activations = [line.split()[1] for line in log if line.startswith("activate ")]
    fit_env = next(p for p in prefixes.values() if (Path(p + ".yaml")).read_text().startswith("# Conda environment for the final"))
    # each env's post-deploy script, then the jobs: 2 sizes x 3 domains trained, 2 multitask
    # models, 2 sweeps, aggregate (torch env); fit, compute, figures, plan (fit env)
    assert len(activations) == 2 + 6 + 2 + 2 + 1 + 4, activations
    assert activations.count(fit_env) == 1 + 4
    table = pd.read_parquet(work / "results" / "losses.parquet")
    assert set(table["size"]) == {"xs", "s"} and (table["status"] == "ok").all()
    assert table["loss"].between(0.5, 10).all()
    for name in ("fits/fits.json", "plan.md", "figures/fig1_unified_cross_domain.png"):
        assert (work / "results" / name).stat().st_size > 0


def test_the_fit_env_has_no_torch_and_its_rules_do_not_need_it(conda_run):
    work, _, log, _, _, _ = conda_run
    created = [line.split() for line in log if line.startswith("create ")]
    fit_prefix = next(Path(p) for _, f, p in created if "final rules" in Path(f).read_text())
    py = str(fit_prefix / "bin" / "python")
    for module in ("torch", "transformers", "safetensors"):
        out = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True)
        assert out.returncode != 0 and "No module named" in out.stderr, module
    # the rules that ran in it did their work (the previous test): here the CLI again, by hand
    out = subprocess.run([str(fit_prefix / "bin" / "mergelaws"), "plan", str(work / "results" / "losses.parquet"),
                          "--fits", str(work / "results" / "fits" / "fits.json"),
                          "--config", str(work / "results" / "config.resolved.yaml"),
                          "--compute", str(work / "results" / "compute.csv"), "--multitask",
                          *sorted(str(p) for p in (work / "results" / "multitask").glob("*/losses.parquet")),
                          "--out", str(work / "plan-again")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "plan-again" / "plan.md").read_text() == (work / "results" / "plan.md").read_text()


def test_a_second_run_reuses_the_envs(conda_run):
    work, _, _, _, cmd, env = conda_run
    proc = subprocess.run([*cmd, "-n"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert "Creating conda environment" not in proc.stdout + proc.stderr


def test_the_openrlhf_backend_gives_rule_train_its_own_env(conda_run, tmp_path):
    """A dry run with train.backend openrlhf: the train jobs would get envs/train-openrlhf.yaml,
    the other rules keep theirs (Snakemake names each env it would create)."""
    work, cfg, _, _, cmd, env = conda_run
    cfg = {**cfg, "results": str(tmp_path / "results"), "train": {**cfg["train"], "backend": "openrlhf"}}
    cfgfile = tmp_path / "openrlhf.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    dry = [*cmd[:cmd.index("--directory") + 1], str(tmp_path), "--configfile", str(cfgfile), "--cores", "2",
           "--sdm", "conda", "-n"]
    proc = subprocess.run(dry, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for name in ("train-openrlhf.yaml", "mergelaws.yaml", "fit.yaml"):
        assert f"envs/{name} will be created" in out, out[-3000:]
