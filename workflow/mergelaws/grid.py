"""The experiment grid as a pure function of the config: sizes, domains, k, subsets, paths.

Subsets are data, not code paths: (domains, k values, subsets per k, seed, sampler) give a
deterministic list of subsets with stable ids, used by the Snakefile, the CLI and the tests.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subset:
    k: int
    members: tuple[str, ...]  # sorted domain names

    @property
    def id(self) -> str:
        return subset_id(self.members)

    @property
    def label(self) -> str:
        return "+".join(self.members)


def subset_id(members) -> str:
    """Stable short id: 'base' for the empty subset, else a hash of the sorted member names."""
    members = sorted(members)
    if not members:
        return "base"
    return "s" + hashlib.sha1("+".join(members).encode()).hexdigest()[:10]


def domains(cfg: dict) -> list[str]:
    return list(cfg["domains"])


def sizes(cfg: dict) -> list[str]:
    return list(cfg["bases"])


def methods(cfg: dict) -> list[str]:
    return list(cfg["methods"])


def k_values(cfg: dict) -> list[int]:
    m = len(cfg["domains"])
    ks = cfg["sweep"]["k"]
    return list(range(m + 1)) if ks == "all" else sorted(ks)


def diverse_orders(items: list[str], n_orders: int, rng: random.Random,
                   candidates: int = 1000) -> list[list[str]]:
    """The paper's Algorithm 1: the identity order, its reverse, then greedy max-min Hamming."""
    orders = [list(items)]
    if n_orders >= 2:
        orders.append(list(reversed(items)))
    while len(orders) < n_orders:
        best, best_score = None, -1
        for _ in range(candidates):
            cand = list(items)
            rng.shuffle(cand)
            score = min(sum(a != b for a, b in zip(cand, o)) for o in orders)
            if score > best_score:
                best, best_score = cand, score
        orders.append(best)
    return orders[:n_orders]


def _sample_combinations(pool: list[str], k: int, n: int, rng: random.Random) -> list[tuple[str, ...]]:
    total = math.comb(len(pool), k)
    if total <= n:
        return [tuple(c) for c in itertools.combinations(pool, k)]
    if total <= 200_000:
        return rng.sample([tuple(c) for c in itertools.combinations(pool, k)], n)
    seen: set[tuple[str, ...]] = set()
    while len(seen) < n:  # rejection sampling for huge pools
        seen.add(tuple(sorted(rng.sample(pool, k))))
    return sorted(seen)


def adaptive_order(pool: list[str], k: int, cap: int, seed) -> list[tuple[str, ...]]:
    """The seeded order in which ``sampler: adaptive`` visits the k-subsets: the uniform
    sampler's seeded draw (same generator, so the first ``cap`` are the uniform sampler's
    ``subsets_per_k = cap`` subsets) kept in draw order, and a seeded permutation where every
    k-subset fits under the cap (never the lexicographic order, whose prefixes are biased).
    The adaptive sweep evaluates a prefix of this list at each k."""
    rng = random.Random(f"mergelaws-subsets:{seed}:{k}")
    total = math.comb(len(pool), k)
    n = min(cap, total)
    if total <= 200_000:
        return [tuple(c) for c in rng.sample([tuple(c) for c in itertools.combinations(pool, k)], n)]
    seen: dict[tuple[str, ...], None] = {}
    while len(seen) < n:  # rejection sampling for huge pools, in draw order
        seen.setdefault(tuple(sorted(rng.sample(pool, k))), None)
    return list(seen)


def adaptive_orders(cfg: dict, size: str | None = None) -> dict[int, list[Subset]]:
    """k -> the subsets ``sampler: adaptive`` may evaluate at k, in its seeded order (a sweep
    stops early at a k once the standard error of that k's mean is below ``sweep.target_sem``;
    see mergelaws.sweep.adaptive_decision). The cap per k is ``sweep.subsets_per_k``."""
    pool = sorted(domains(cfg))
    cap = sweep_settings(cfg, size)["subsets_per_k"]
    return {k: [Subset(k, tuple(sorted(c))) for c in adaptive_order(pool, k, cap, cfg["seed"])]
            for k in k_values(cfg)}


def sweep_settings(cfg: dict, size: str | None = None) -> dict:
    """The global `sweep` settings with a size's overrides (bases.<size>.sweep) applied."""
    out = dict(cfg["sweep"])
    if size is not None:
        out.update(cfg["bases"][size].get("sweep") or {})
    return out


def train_settings(cfg: dict, size: str | None = None) -> dict:
    """The global `train` settings with a size's overrides (bases.<size>.train) applied."""
    out = dict(cfg["train"])
    if size is not None:
        out.update(cfg["bases"][size].get("train") or {})
    return out


def subsets(cfg: dict, size: str | None = None) -> list[Subset]:
    """Every subset the sweep evaluates for a size (all sizes alike unless bases.<size>.sweep
    overrides the sampling), for every method alike, in a fixed order. For ``sampler:
    adaptive`` these are the subsets it may evaluate (up to ``subsets_per_k`` per k); the
    sweep evaluates a seeded prefix of them at each k (``adaptive_orders``)."""
    pool = sorted(domains(cfg))
    sweep = sweep_settings(cfg, size)
    ks = k_values(cfg)
    seed = cfg["seed"]
    out: dict[str, Subset] = {}
    if sweep["sampler"] == "adaptive":  # the most it may evaluate; the sweep stops early per k
        for k, subs in adaptive_orders(cfg, size).items():
            for s in subs:
                out.setdefault(s.id, s)
    elif sweep["sampler"] == "orders":
        rng = random.Random(f"mergelaws-orders:{seed}")
        for order in diverse_orders(pool, sweep["orders"], rng):
            for k in ks:
                s = Subset(k, tuple(sorted(order[:k])))
                out.setdefault(s.id, s)
    else:
        for k in ks:
            rng = random.Random(f"mergelaws-subsets:{seed}:{k}")
            for combo in _sample_combinations(pool, k, sweep["subsets_per_k"], rng):
                s = Subset(k, tuple(sorted(combo)))
                out.setdefault(s.id, s)
    return sorted(out.values(), key=lambda s: (s.k, s.members))


# ---- paths (one place; the Snakefile uses these) ----------------------------------------

def results_dir(cfg: dict) -> Path:
    return Path(cfg["results"])


def base_kind(cfg: dict, size: str) -> str:
    """How a size's base is made: 'model' (given, used as is), 'gguf' (rule convert) or
    'pretrain' (rule pretrain, from the architecture keys)."""
    spec = cfg["bases"][size]
    return "model" if spec.get("model") else "gguf" if spec.get("gguf") else "pretrain"


def sizes_of_kind(cfg: dict, kind: str) -> list[str]:
    return [s for s in sizes(cfg) if base_kind(cfg, s) == kind]


def gguf_dtype(cfg: dict, size: str) -> str:
    """Storage dtype of a converted GGUF base: bases.<size>.dtype, default bfloat16."""
    return cfg["bases"][size].get("dtype") or "bfloat16"


def base_dir(cfg: dict, size: str) -> str:
    """The base model of a size: the configured model, else the output of rule convert (a `gguf`
    base) or rule pretrain (a tiny base): <results>/bases/<size>."""
    model = cfg["bases"][size].get("model")
    return model if model else str(results_dir(cfg) / "bases" / size)


def is_local(path: str) -> bool:
    """A base given as an existing directory (else it is a Hugging Face hub id)."""
    return Path(path).is_dir()


def own_experts(cfg: dict, size: str) -> dict[str, str]:
    """The existing fine-tunes a size uses instead of training (bases.<size>.experts):
    domain -> a local model directory or a Hugging Face hub id."""
    return dict(cfg["bases"][size].get("experts") or {})


def is_own_expert(cfg: dict, size: str, domain: str) -> bool:
    return domain in own_experts(cfg, size)


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` (one slash, no leading '.', '/' or '~', no '..'): a hub id unless such a
    directory exists; anything else names a local path."""
    return bool(HUB_ID.fullmatch(path)) and ".." not in path and not Path(path).exists()


def expert_dir(cfg: dict, size: str, domain: str) -> str:
    """A size's expert for a domain: the user's path or hub id where bases.<size>.experts lists
    the domain, else the train rule's output."""
    own = own_experts(cfg, size).get(domain)
    return own if own else str(results_dir(cfg) / "experts" / size / domain)


def expert_input(cfg: dict, size: str, domain: str) -> list[str]:
    """What Snakemake waits for before using an expert: its config.json (the train rule's
    output, or the user's local directory's existing file, which no rule makes); nothing for a
    hub id (downloaded by the job that loads it, like a hub-id base)."""
    path = expert_dir(cfg, size, domain)
    if is_own_expert(cfg, size, domain) and not is_local(path):
        return []
    return [f"{path}/config.json"]


def n_shards(cfg: dict, size: str) -> int:
    """Sweep jobs per (size, method): bases.<size>.sweep.shards, else sweep.shards."""
    return int(sweep_settings(cfg, size).get("shards", 1))


def shards(cfg: dict, size: str) -> list[str]:
    """Shard labels of a size's sweeps: '1of1', or '1of4' .. '4of4'."""
    n = n_shards(cfg, size)
    return [f"{i}of{n}" for i in range(1, n + 1)]


def parse_shard(shard: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)of(\d+)", shard)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"shard {shard!r} is not of the form '<i>of<n>' with 1 <= i <= n (e.g. '2of4')")
    return int(m.group(1)), int(m.group(2))


def shard_subsets(cfg: dict, size: str, shard: str = "1of1") -> list[Subset]:
    """The subsets one sweep shard evaluates: every n-th subset from the i-th (round robin,
    so each shard gets a similar mix of k and similar work)."""
    i, n = parse_shard(shard)
    if n != n_shards(cfg, size):
        raise ValueError(f"shard {shard!r} does not match the {n_shards(cfg, size)} shards configured for size "
                         f"{size!r} (sweep.shards / bases.{size}.sweep.shards)")
    return subsets(cfg, size)[i - 1::n]


def sweep_file(cfg: dict, size: str, method: str, shard: str = "1of1") -> str:
    return str(results_dir(cfg) / "sweeps" / size / method / f"{shard}.parquet")


def sweep_files(cfg: dict) -> list[str]:
    """Every sweep output the aggregate rule gathers."""
    return [sweep_file(cfg, s, m, sh) for s in sizes(cfg) for m in methods(cfg) for sh in shards(cfg, s)]
