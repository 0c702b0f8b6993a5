"""Checks on the shipped text-domain data in data/domains (stdlib gzip/json only)."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "data" / "domains"
SPLITS = ("train", "eval")
MANIFEST = json.loads((ROOT / "manifest.json").read_text(encoding="utf-8"))
DOMAINS = list(MANIFEST["domains"])
LIMITS = MANIFEST["limits"]


def load(domain: str, split: str) -> list[dict]:
    with gzip.open(ROOT / domain / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


_CACHE: dict[tuple[str, str], list[dict]] = {}


def rows(domain: str, split: str) -> list[dict]:
    if (domain, split) not in _CACHE:
        _CACHE[(domain, split)] = load(domain, split)
    return _CACHE[(domain, split)]


def test_enough_domains_and_few_generated():
    assert len(DOMAINS) >= 6
    generated = [d for d, info in MANIFEST["domains"].items() if info["generated"]]
    assert 3 * len(generated) <= len(DOMAINS), generated
    # every domain directory on disk is in the manifest and vice versa
    on_disk = sorted(p.name for p in ROOT.iterdir() if p.is_dir())
    assert on_disk == sorted(DOMAINS)


def test_sources_md_mentions_every_domain():
    text = (ROOT / "SOURCES.md").read_text(encoding="utf-8")
    for d in DOMAINS:
        assert f"## {d}" in text


@pytest.mark.parametrize("domain", DOMAINS)
def test_files_match_manifest(domain):
    info = MANIFEST["domains"][domain]
    assert isinstance(MANIFEST["seed"], int)
    assert info["source_versions"]
    for split in SPLITS:
        path = ROOT / domain / f"{split}.jsonl.gz"
        assert path.is_file(), path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"][split]
        assert len(rows(domain, split)) == info["counts"][split]
        assert info["counts"][split] > 0
    # gzip written deterministically: no mtime, no embedded file name
    head = (ROOT / domain / "train.jsonl.gz").read_bytes()[:10]
    assert head[4:8] == b"\x00\x00\x00\x00" and not head[3] & 0x08


@pytest.mark.parametrize("domain", DOMAINS)
def test_rows_well_formed(domain):
    for split in SPLITS:
        for r in rows(domain, split):
            assert set(r) == {"prompt", "response"}
            assert isinstance(r["prompt"], str) and r["prompt"].strip()
            assert isinstance(r["response"], str) and r["response"].strip()
            assert len(r["prompt"]) <= LIMITS["max_prompt_chars"]
            n = len(r["response"])
            assert LIMITS["min_response_chars"] <= n <= LIMITS["max_response_chars"]
            assert "\x00" not in r["prompt"] + r["response"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_sizes(domain):
    c = MANIFEST["domains"][domain]["counts"]
    assert c["train"] >= 1500 and c["eval"] >= 150
    assert c["train"] <= LIMITS["target_train"] + 50 and c["eval"] <= LIMITS["target_eval"] + 50


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_disjoint(domain):
    tr, ev = rows(domain, "train"), rows(domain, "eval")
    for key in ("prompt", "response"):
        a, b = {r[key] for r in tr}, {r[key] for r in ev}
        assert not a & b, f"{domain}: {key} shared by train and eval"
        # also after normalisation (case, punctuation, whitespace)
        norm = lambda s: re.sub(r"[^0-9a-z]+", "", s.lower())  # noqa: E731
        assert not {norm(x) for x in a} & {norm(x) for x in b}
    # and no duplicates inside a split
    for split_rows in (tr, ev):
        assert len({r["prompt"] for r in split_rows}) == len(split_rows)
        assert len({r["response"] for r in split_rows}) == len(split_rows)


def test_no_response_shared_across_domains():
    owner: dict[str, str] = {}
    for d in DOMAINS:
        for split in SPLITS:
            for r in rows(d, split):
                prev = owner.setdefault(r["response"], d)
                assert prev == d, f"response shared by {prev} and {d}"


def _char_profile(domain: str) -> dict[str, float]:
    """Character-bigram distribution of the training responses."""
    counts = collections.Counter()
    for r in rows(domain, "train"):
        s = r["response"]
        counts.update(s[i: i + 2] for i in range(len(s) - 1))
    total = sum(counts.values())
    return {c: n / total for c, n in counts.items()}


def _js_divergence(p: dict[str, float], q: dict[str, float]) -> float:
    js = 0.0
    for c in set(p) | set(q):
        a, b = p.get(c, 0.0), q.get(c, 0.0)
        m = (a + b) / 2
        if a:
            js += 0.5 * a * math.log2(a / m)
        if b:
            js += 0.5 * b * math.log2(b / m)
    return js


def test_domains_differ_in_character_statistics():
    """Response character-bigram distributions differ between every pair of domains.

    (Jensen-Shannon divergence in bits; the closest pair of English-prose domains is ~0.05.)
    """
    prof = {d: _char_profile(d) for d in DOMAINS}
    for i, a in enumerate(DOMAINS):
        for b in DOMAINS[i + 1:]:
            assert _js_divergence(prof[a], prof[b]) > 0.02, (a, b)


def test_domains_differ_in_vocabulary():
    """A nearest-centroid classifier on word unigrams tells the domains apart on eval data."""
    def words(s):
        return re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", s.lower())

    cent = {}
    for d in DOMAINS:
        c = collections.Counter()
        for r in rows(d, "train"):
            c.update(words(r["prompt"] + "\n" + r["response"]))
        total = sum(c.values())
        cent[d] = {w: n / total for w, n in c.items()}
    for d in DOMAINS:
        ev = rows(d, "eval")
        hits = 0
        for r in ev:
            toks = words(r["prompt"] + "\n" + r["response"])
            scores = {e: sum(math.log(cent[e].get(t, 0) + 1e-6) for t in toks) for e in DOMAINS}
            hits += max(scores, key=scores.get) == d
        assert hits / len(ev) > 0.9, (d, hits / len(ev))


def _arith_ok(expr: str, answer: str) -> bool:
    assert re.fullmatch(r"[0-9+\-*/() ]+", expr)
    # exact evaluation with Fractions
    toks = re.findall(r"\d+|[+\-*/()]", expr)
    pos = 0

    def atom():
        nonlocal pos
        t = toks[pos]
        pos += 1
        if t == "(":
            v = add()
            pos += 1
            return v
        if t == "-":
            return -atom()
        return Fraction(int(t))

    def mul():
        nonlocal pos
        v = atom()
        while pos < len(toks) and toks[pos] in "*/":
            op = toks[pos]
            pos += 1
            w = atom()
            v = v * w if op == "*" else v / w
        return v

    def add():
        nonlocal pos
        v = mul()
        while pos < len(toks) and toks[pos] in "+-":
            op = toks[pos]
            pos += 1
            w = mul()
            v = v + w if op == "+" else v - w
        return v

    return add() == Fraction(int(answer))


def test_arithmetic_answers_are_correct():
    if "arithmetic" not in DOMAINS:
        pytest.skip("no arithmetic domain")
    n = 0
    for split in SPLITS:
        for r in rows("arithmetic", split):
            m = re.fullmatch(r"Evaluate step by step: (.+)", r["prompt"])
            if not m:
                continue
            ans = re.search(r"^Answer: (-?\d+)$", r["response"], re.M).group(1)
            assert _arith_ok(m.group(1), ans), r
            n += 1
    assert n > 100


def test_algebra_answers_are_correct():
    if "algebra" not in DOMAINS:
        pytest.skip("no algebra domain")

    def side(expr: str, env: dict[str, int]) -> Fraction:
        e = re.sub(r"(\d)([a-z(])", r"\1*\2", expr.replace(" ", ""))
        e = re.sub(r"\)\(", ")*(", e)
        for v, val in env.items():
            e = re.sub(rf"(?<![a-z]){v}(?![a-z])", f"({val})", e)
        assert re.fullmatch(r"[0-9+\-*/()]+", e), e
        e = re.sub(r"(?<![0-9)])-\(", "-1*(", e)
        return Fraction(eval(e, {"__builtins__": {}}, {}))  # only digits/operators here

    for split in SPLITS:
        for r in rows("algebra", split):
            ans = dict(re.findall(r"([a-z]) = (-?\d+)", r["response"].split("Answer:")[-1]))
            env = {k: int(v) for k, v in ans.items()}
            eqs = re.findall(r"(?:Solve for [a-z]: |\(\d\) )(.+)", r["prompt"])
            assert eqs and env, r
            for eq in eqs:
                lhs, rhs = eq.split(" = ")
                assert side(lhs, env) == side(rhs, env), (r["prompt"], env)
