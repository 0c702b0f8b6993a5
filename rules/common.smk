# Input functions, wildcard constraints and resources; the logic lives in mergelaws.grid.
import copy
import os
import re

import yaml
from snakemake.exceptions import WorkflowError

from mergelaws import config as mlconfig
from mergelaws import grid
from mergelaws import orders as mlorders

try:
    for _path in workflow.configfiles:  # duplicate keys are lost by the YAML parser: refuse them
        mlconfig.read_yaml(_path)
    CFG = mlconfig.validate(copy.deepcopy(config))
except mlconfig.ConfigError as exc:
    raise WorkflowError(str(exc))

RESULTS = str(grid.results_dir(CFG))
SIZES = grid.sizes(CFG)
DOMAINS = grid.domains(CFG)
METHODS = grid.methods(CFG)

# The resolved config the CLI reads: rewritten only when its content changes. Rules do not
# take it as an input; each rule's `params` carry the config parts it depends on, so editing
# one setting reruns exactly the jobs that use it.
RESOLVED = f"{RESULTS}/config.resolved.yaml"


def _write_resolved():
    text = yaml.safe_dump(CFG, sort_keys=True)
    path = Path(RESOLVED)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


_write_resolved()

# conda envs (--software-deployment-method conda): the train rule's depends on the backend.
# Each env's post-deploy script installs this checkout into it from MERGELAWS_ROOT (env files
# are copied to .snakemake/conda/ before creation, so they cannot name it by a relative path).
os.environ.update(MERGELAWS_ROOT=str(workflow.basedir))
TORCH_ENV = "../envs/mergelaws.yaml"
FIT_ENV = "../envs/fit.yaml"
TRAIN_ENV = "../envs/train-openrlhf.yaml" if CFG["train"]["backend"] == "openrlhf" else TORCH_ENV


def _alternation(names):
    return "|".join(re.escape(n) for n in names)


def _sizes_re(sizes):
    return _alternation(sizes) if sizes else "(?!)"  # (?!) matches nothing: no size of that kind


# rules pretrain and convert both write <results>/bases/<size>/: each takes the sizes of its kind
PRETRAIN_SIZES = [s for s in SIZES if grid.base_kind(CFG, s) != "gguf"]
GGUF_SIZES = grid.sizes_of_kind(CFG, "gguf")


wildcard_constraints:
    size=_alternation(SIZES),
    domain=_alternation(DOMAINS),
    method=_alternation(METHODS),
    shard=r"\d+of\d+",


# trained experts, and your own (bases.<size>.experts) where they are local directories: their
# config.json exists and no rule makes it, so Snakemake plans no train job for them
EXPERTS = [f for s in SIZES for d in DOMAINS for f in grid.expert_input(CFG, s, d)]
# the trained ones (your own experts have no trainer's record): Fig 11 reads the record beside each
TRAINED_EXPERTS = [
    f for s in SIZES for d in DOMAINS if not grid.is_own_expert(CFG, s, d) for f in grid.expert_input(CFG, s, d)
]
LOSSES = [f"{RESULTS}/losses.parquet", f"{RESULTS}/losses.csv"]
FITS = [f"{RESULTS}/fits/fits.json", f"{RESULTS}/fits/summary.csv"]
PLAN = [f"{RESULTS}/plan.md", f"{RESULTS}/plan.json"]
# the multitask reference (multitask.enabled): one model and one losses table per size
MULTITASK = (
    [f"{RESULTS}/multitask/{s}/losses.parquet" for s in SIZES] if CFG["multitask"]["enabled"] else []
)
# the compute ledger: the benchmark files of every job that runs before the plan
BENCH = f"{RESULTS}/benchmarks"
BENCHMARKS = (
    [f"{BENCH}/train/{s}/{d}.tsv" for s in SIZES for d in DOMAINS if not grid.is_own_expert(CFG, s, d)]
    + [f"{BENCH}/multitask/{s}.tsv" for s in SIZES if MULTITASK]
    + [f"{BENCH}/sweep/{s}/{m}/{sh}.tsv" for s in SIZES for m in METHODS for sh in grid.shards(CFG, s)]
    + [f"{BENCH}/aggregate.tsv", f"{BENCH}/fit.tsv"]
)
COMPUTE = f"{RESULTS}/compute.csv"
# Theorem 3.1's predicted curves (theory.enabled; rules/theory.smk), read by the plan
THEORY = (
    [f"{RESULTS}/theory/{s}{ext}" for s in SIZES for ext in (".parquet", ".json", "_compare.csv")]
    if CFG.get("theory", {}).get("enabled", False)
    else []
)
THEORY_COMPARE = [f for f in THEORY if f.endswith("_compare.csv")]
FIGURE_KINDS = ("loss_vs_k", "variance_vs_k")
FIGURE_VIEWS = ("in_domain", "cross_domain")
FIGURES = [
    f"{RESULTS}/figures/{kind}_{view}.{ext}"
    for kind in FIGURE_KINDS
    for view in FIGURE_VIEWS
    for ext in ("png", "pdf")
]
# analogues of the paper's figures 1, 3, 4a, 4b, 5 and 7, on the headline view
FIGURES += [
    f"{RESULTS}/figures/{name}_{CFG['fit']['view']}.{ext}"
    for name in ("fig1_unified", "fig3_scatter", "fig4a_floor_tail", "fig4b_return")
    + ("fig5_methods", "fig7_forecast")
    for ext in ("png", "pdf")
]
# the further analyses and their tables (mergelaws.plots.more_outputs): pool size (Fig 6),
# ΔL(k) (Fig 9b), every subset per method (13-15), per-domain grids per method (16-19),
# synergy (21), CE vs N per k (22)
_V = CFG["fit"]["view"].replace(":", "-")
FIGURES += [
    f"{RESULTS}/figures/{stem}.{ext}"
    for stem in [f"fig6_pool_size_{_V}", f"fig9b_gain_{_V}"]
    + [f"fig13_scatter_{m}_{_V}" for m in sorted(METHODS)]
    + [f"fig16_domains_{m}" for m in sorted(METHODS)]
    + ["fig21_synergy", f"fig22_ce_vs_N_{_V}"]
    for ext in ("png", "pdf")
]
FIGURES += [f"{RESULTS}/figures/{t}.{ext}" for t in (f"pool_size_{_V}", "synergy") for ext in ("parquet", "csv")]
# Fig 2: merging vs the multitask model, per domain, with the compute of each
if CFG["multitask"]["enabled"]:
    FIGURES += [f"{RESULTS}/figures/fig2_multitask.{ext}" for ext in ("png", "pdf")]
# optional (mergelaws.orders.figure_outputs): order dispersion (Fig 8, a size with sampler:
# orders), experts' fine-tuning loss (Fig 11, trained experts), sampled orders vs full
# enumeration (Fig 12, a size with every subset)
FIGURES += [
    f"{RESULTS}/figures/{name}"
    for name in mlorders.figure_outputs(CFG, CFG["fit"]["view"], bool(TRAINED_EXPERTS))
]

# figures with a caption of their own (report/<name>.rst); the rest share paper_figures.rst
_CAPTIONS = {"fig8_": "orders", "fig11_": "experts", "fig12_": "sampled_vs_full"}


def figure_outputs():
    """The figures, the PNGs marked for `snakemake --report` with their captions."""
    out = []
    for path in FIGURES:
        name = os.path.basename(path)
        kind = next((k for k in FIGURE_KINDS if name.startswith(k)), "paper_figures")
        kind = next((rst for pre, rst in _CAPTIONS.items() if name.startswith(pre)), kind)
        if path.endswith(".png"):
            caption = f"../report/{kind}.rst"
            out.append(report(path, caption=caption, category="Figures"))
        else:
            out.append(path)
    return out


def base_input(wildcards):
    """The base's config.json when the base is a local directory or built here (rule pretrain,
    or rule convert for a `gguf` base)."""
    path = grid.base_dir(CFG, wildcards.size)
    if grid.base_kind(CFG, wildcards.size) == "gguf" or grid.is_local(path) or path.startswith(RESULTS):
        return f"{path}/config.json"
    return []


def expert_inputs(wildcards):
    """Each expert's config.json: the train rule's output, or your own local expert's (which
    exists); a hub-id expert is no input at all (the sweep downloads it, as a hub-id base)."""
    return [f for d in DOMAINS for f in grid.expert_input(CFG, wildcards.size, d)]


def res(rule, key, default):
    """A resource from config: resources.default < resources.<rule> < bases.<size>.resources."""

    def get(wildcards, attempt=1):  # retries get more memory and time, up to a cap
        return mlconfig.resource(CFG, rule, getattr(wildcards, "size", None), key, default, attempt)

    return get


def threads_for(rule):
    return lambda wildcards: mlconfig.base_resources(
        CFG, rule, getattr(wildcards, "size", None)
    ).get("threads", 1)
