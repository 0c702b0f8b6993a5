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


def sweep_settings(cfg: dict, size: str | None = None) -> dict:
    """The global `sweep` settings with a size's overrides (bases.<size>.sweep) applied."""
    out = dict(cfg["sweep"])
    if size is not None:
        out.update(cfg["bases"][size].get("sweep") or {})
    return out


def subsets(cfg: dict, size: str | None = None) -> list[Subset]:
    """Every subset the sweep evaluates for a size (all sizes alike unless bases.<size>.sweep
    overrides the sampling), for every method alike, in a fixed order."""
    pool = sorted(domains(cfg))
    sweep = sweep_settings(cfg, size)
    ks = k_values(cfg)
    seed = cfg["seed"]
    out: dict[str, Subset] = {}
    if sweep["sampler"] == "orders":
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


def base_dir(cfg: dict, size: str) -> str:
    """The base model of a size: the configured model, or the pretrain rule's output."""
    model = cfg["bases"][size].get("model")
    return model if model else str(results_dir(cfg) / "bases" / size)


def is_local(path: str) -> bool:
    """A base given as an existing directory (else it is a Hugging Face hub id)."""
    return Path(path).is_dir()


def expert_dir(cfg: dict, size: str, domain: str) -> str:
    return str(results_dir(cfg) / "experts" / size / domain)


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
