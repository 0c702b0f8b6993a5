"""The experiment grid as a pure function of the config: sizes, domains, k, subsets, paths.

Subsets are data, not code paths: (domains, k values, subsets per k, seed, sampler) give a
deterministic list of subsets with stable ids, used by the Snakefile, the CLI and the tests.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
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


def subsets(cfg: dict) -> list[Subset]:
    """Every subset the sweep evaluates, for every size and method alike, in a fixed order."""
    pool = sorted(domains(cfg))
    sweep = cfg["sweep"]
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


def sweep_file(cfg: dict, size: str, method: str) -> str:
    return str(results_dir(cfg) / "sweeps" / size / f"{method}.parquet")
