"""The SLURM profiles and the micro/paper configs, checked without a SLURM: the profiles parse
and carry the keys a cluster run needs, and Snakemake dry runs plan the expected jobs with the
expected resources (a real SLURM run is .ci/slurm-e2e.sh)."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from mergelaws import config as mlconfig
from mergelaws import grid

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "profiles" / "slurm" / "config.yaml"
SLURM_CPU = ROOT / "profiles" / "slurm-cpu" / "config.yaml"
MICRO = ROOT / "config" / "micro.yaml"
PAPER = ROOT / "config" / "paper.yaml"


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} must be a mapping"
    return data


def dry_run(*args: str) -> str:
    """`snakemake -n ...` from the repository root; nothing may be downloaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", "-n", "--forceall", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def planned_jobs(out: str) -> list[dict]:
    """The jobs of a dry run's output: rule, wildcards and resources of each."""
    jobs = []
    for block in re.split(r"^(?=rule \w+:$)", out, flags=re.M)[1:]:
        job = {"rule": block.split(":", 1)[0].split()[1], "wildcards": {}, "resources": {}}
        for line in block.splitlines()[1:]:
            key, _, value = line.strip().partition(": ")
            if key in ("wildcards", "resources"):
                job[key] = dict(item.split("=", 1) for item in value.split(", "))
        jobs.append(job)
    return jobs


def job_stats(out: str) -> dict[str, int]:
    stats, inside = {}, False
    for line in out.splitlines():
        if line.startswith("Job stats:"):
            inside = True
        elif inside:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                stats[parts[0]] = int(parts[1])
                if parts[0] == "total":
                    break
    return stats


# ---- the profiles as files ------------------------------------------------------------------

def test_plugin_importable():
    # profiles/slurm needs it even for a dry run: `executor: slurm`
    import snakemake_executor_plugin_slurm  # noqa: F401


def test_slurm_profile_keys():
    p = load(SLURM)
    assert p["executor"] == "slurm"
    assert isinstance(p["jobs"], int) and p["jobs"] >= 1
    assert p["retries"] == 2
    assert p["rerun-incomplete"] is True
    assert p["latency-wait"] >= 5
    assert p["slurm-keep-successful-logs"] is True
    res = p["default-resources"]
    assert {"mem_mb", "runtime", "cpus_per_task"} <= set(res)
    # a number would replace every rule's threads in the sbatch request
    assert res["cpus_per_task"] == "threads"
    # site-specific choices are left to the user
    assert "slurm_account" not in res
    # GPU counts come from the config per size; a profile-wide `gpu` would override them all
    for rule, overrides in (p.get("set-resources") or {}).items():
        assert "gpu" not in overrides, rule


def test_cpu_overlay_keys():
    base, cpu = load(SLURM), load(SLURM_CPU)
    # the overlay REPLACES default-resources and set-resources: it must restate what it needs
    assert set(base["default-resources"]) - {"slurm_partition", "slurm_account"} <= set(cpu["default-resources"])
    for rule in ("train", "multitask", "sweep", "pretrain", "theory", "downstream"):  # every rule with a gpu
        assert cpu["set-resources"][rule]["gpu"] == 0
    assert "executor" not in cpu  # inherited from profiles/slurm
    # without slurmdbd the default status command (sacct) hangs forever: squeue, polled early
    assert cpu["slurm-status-command"] == "squeue"
    # .ci/slurm-up.sh sets MinJobAge=300; the plugin trusts squeue only if it is >= 3x this
    assert 3 * cpu["slurm-init-seconds-before-status-checks"] <= 300
    assert "MinJobAge=300" in (ROOT / ".ci" / "slurm-up.sh").read_text()


def test_ci_scripts_never_hang_and_stop_by_pid():
    up = (ROOT / ".ci" / "slurm-up.sh").read_text()
    down = (ROOT / ".ci" / "slurm-down.sh").read_text()
    e2e = (ROOT / ".ci" / "slurm-e2e.sh").read_text()
    for text in (up, down, e2e):
        assert not re.search(r"^\s*[^#\n]*\b(pkill|killall)\b", text, flags=re.M)
    assert "trap " in e2e and "slurm-down.sh" in e2e
    assert "timeout -k" in e2e
    assert "--profile profiles/slurm --profile profiles/slurm-cpu" in e2e


# ---- the configs ----------------------------------------------------------------------------

def test_micro_config():
    cfg = mlconfig.load(MICRO)
    assert set(grid.sizes(cfg)) == {"xs", "s"}
    assert 3 <= len(grid.domains(cfg)) <= 4
    assert cfg["results"] != "results"  # its own results dir
    for d in cfg["domains"].values():
        assert (ROOT / d["train"]).is_file() and (ROOT / d["eval"]).is_file()
    for b in cfg["bases"].values():
        assert (ROOT / b["model"] / "config.json").is_file()
    assert cfg["train"]["device"] == "cpu" and cfg["sweep"]["device"] == "cpu"


def test_paper_config():
    cfg = mlconfig.load(PAPER)
    sizes = ["0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"]
    assert grid.sizes(cfg) == sizes
    assert [cfg["bases"][s]["model"] for s in sizes] == [f"Qwen/Qwen2.5-{s}" for s in sizes]
    assert sorted(grid.domains(cfg)) == sorted(
        ["algebra", "analysis", "discrete", "geometry", "number_theory", "biology", "physics", "chemistry", "code"])
    # Table 1
    m = cfg["methods"]
    assert m["average"]["scale"] == 1.0
    assert (m["task_arithmetic"]["scale"], m["task_arithmetic"]["combine"]) == (0.8, "mean")
    assert (m["ties"]["density"], m["ties"]["scale"]) == (1.0, 1.0)
    assert m["dare"]["drop_rate"] == 0.2
    # all C(9, k) subsets: 2^9 = 512 per (size, method) for N <= 7B; diverse orders above
    for s in sizes:
        subs = grid.subsets(cfg, s)
        if s in ("14B", "32B", "72B"):
            assert cfg["bases"][s]["sweep"]["sampler"] == "orders"
            assert 9 < len(subs) < 512 and {x.k for x in subs} == set(range(10))
        else:
            assert len(subs) == 512
    assert len(grid.subsets(cfg)) == 512  # the global setting
    # resources grow with size
    for key in ("gpu", "mem_mb", "runtime"):
        values = [cfg["bases"][s]["resources"][key] for s in sizes]
        assert values == sorted(values) and values[0] < values[-1], key


# ---- dry runs -------------------------------------------------------------------------------

def test_dry_run_slurm_micro():
    cfg = mlconfig.load(MICRO)
    out = dry_run("--profile", "profiles/slurm", "--configfile", "config/micro.yaml")
    stats = job_stats(out)
    n_sizes, n_domains, n_methods = len(grid.sizes(cfg)), len(grid.domains(cfg)), len(grid.methods(cfg))
    assert stats["train"] == n_sizes * n_domains
    assert stats["sweep"] == n_sizes * n_methods
    assert stats["aggregate"] == stats["fit"] == stats["figures"] == stats["compute"] == 1
    assert stats["multitask"] == n_sizes
    assert "pretrain" not in stats and "tokenizer" not in stats  # shipped bases
    jobs = planned_jobs(out)
    assert Counter(j["rule"] for j in jobs) == Counter({k: v for k, v in stats.items() if k != "total"})
    for job in jobs:
        res = job["resources"]
        if job["rule"] in ("train", "multitask", "sweep"):
            # from config/micro.yaml's resources.default
            assert (res["mem_mb"], res["runtime"], res["cpus_per_task"], res["gpu"]) == ("1500", "10", "1", "0")
        elif job["rule"] != "all":
            # from the profile's default-resources
            assert (res["mem_mb"], res["runtime"], res["cpus_per_task"]) == ("8000", "60", "1")


def test_dry_run_slurm_with_cpu_overlay():
    out = dry_run("--profile", "profiles/slurm", "--profile", "profiles/slurm-cpu",
                  "--configfile", "config/micro.yaml")
    jobs = [j for j in planned_jobs(out) if j["rule"] != "all"]
    assert jobs
    for job in jobs:
        res = job["resources"]
        assert res["slurm_partition"] == "debug"
        assert res["cpus_per_task"] == "1"
        if job["rule"] in ("train", "multitask", "sweep"):
            assert res["gpu"] == "0" and res["mem_mb"] == "1500"
        else:
            assert res["mem_mb"] == "1000"  # the overlay's default-resources replaced the base's


def test_dry_run_paper_plans_the_grid_offline():
    cfg = mlconfig.load(PAPER)
    # --cores: a dry run otherwise runs with 1 core and caps every job's threads at 1
    out = dry_run("--profile", "profiles/slurm", "--cores", "256", "--configfile", "config/paper.yaml")
    stats = job_stats(out)
    assert stats["train"] == 7 * 9
    assert stats["sweep"] == 4 * sum(grid.n_shards(cfg, s) for s in grid.sizes(cfg))
    assert "pretrain" not in stats and "tokenizer" not in stats  # hub ids: nothing to build
    jobs = planned_jobs(out)
    for job in jobs:
        if job["rule"] in ("train", "sweep"):
            want = cfg["bases"][job["wildcards"]["size"]]["resources"]
            res = job["resources"]
            assert int(res["gpu"]) == want["gpu"]
            assert int(res["mem_mb"]) == want["mem_mb"]
            assert int(res["runtime"]) == want["runtime"]
            assert int(res["cpus_per_task"]) == want["threads"]
            if job["rule"] == "train":  # multi-node training for the largest experts only
                assert int(res["nodes"]) == want.get("train", {}).get("nodes", 1)
            else:
                assert "nodes" not in res


def test_dry_run_paper_job_count():
    """The brief's command as is: `snakemake -n --configfile config/paper.yaml`."""
    cfg = mlconfig.load(PAPER)
    out = dry_run("--configfile", "config/paper.yaml", "--quiet", "rules")
    stats = job_stats(out)
    n = len(grid.sizes(cfg))
    assert stats["train"] == n * len(grid.domains(cfg)) == 63
    # sweeps batched per (size, method, shard): hundreds of jobs, not one per subset
    n_sweeps = len(grid.methods(cfg)) * sum(grid.n_shards(cfg, s) for s in grid.sizes(cfg))
    assert stats["sweep"] == n_sweeps and 100 <= n_sweeps <= 1000
    assert stats["multitask"] == n  # the multitask reference of Table 13, one per size
    once = {k: v for k, v in stats.items() if k not in ("train", "sweep", "multitask", "total")}
    assert {"aggregate", "fit", "compute", "figures", "all"} <= set(once) and set(once.values()) == {1}
    assert stats["total"] == 63 + n + n_sweeps + len(once)


# ---- retries: memory and time grow with the attempt ---------------------------------------

def test_resources_grow_with_the_attempt_up_to_the_cap():
    cfg = mlconfig.load(PAPER)
    want = cfg["bases"]["7B"]["resources"]
    got = [mlconfig.resource(cfg, "train", "7B", "mem_mb", 1, a) for a in (1, 2, 3)]
    assert got == [want["mem_mb"], 2 * want["mem_mb"], 3 * want["mem_mb"]]
    assert mlconfig.resource(cfg, "sweep", "7B", "runtime", 1, 2) == 2 * want["runtime"]
    assert mlconfig.resource(cfg, "train", "7B", "gpu", 0, 3) == want["gpu"]  # GPUs do not grow
    cfg["bases"]["7B"]["resources"]["max_mem_mb"] = int(want["mem_mb"] * 1.5)
    assert mlconfig.resource(cfg, "train", "7B", "mem_mb", 1, 3) == int(want["mem_mb"] * 1.5)


def test_a_job_that_ran_out_of_memory_is_retried_with_more(tmp_path):
    """A real Snakemake run: the job fails while its memory request is below what it needs and
    succeeds on the retry, whose request comes from the same function the rules use."""
    cfg = mlconfig.load(MICRO)
    cfg["resources"]["default"].update(mem_mb=1500, max_mem_mb=4000)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "Snakefile").write_text(f'''
from mergelaws import config as mlconfig
CFG = mlconfig.load("{tmp_path / 'cfg.yaml'}")

rule needy:
    output: "done.txt"
    resources:
        mem_mb=lambda wc, attempt: mlconfig.resource(CFG, "train", None, "mem_mb", 1000, attempt)
    shell: "echo {{resources.mem_mb}} >> attempts.txt; test {{resources.mem_mb}} -ge 2500 && touch {{output}}"
''')
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--retries", "2", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "attempts.txt").read_text().split() == ["1500", "3000"]
    assert (tmp_path / "done.txt").exists()
