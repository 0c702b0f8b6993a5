"""`mergelaws predict`: the merging curve of one size from its experts alone, by variant:

* ``theta0``     the quadratic model at theta_0 (Gauss-Newton by JVPs);
* ``center``     the quadratic model at theta_0 + c mu, the merge of all M (only v_i - mu enters);
* ``calibrated`` ``center`` with the curvature of each expert's direction rescaled so that the
                 model gives the exact losses of the M single-expert merges (M extra evaluations);
* ``weights``    no JVP at all: loss and gradient at theta_0 + c mu (one backward pass), the
                 weight-space Gram v_i^T v_j as curvature, calibrated the same way;
* ``sampled``    ``weights`` on seeded samples of the eval examples, per domain and balanced by
                 response length (``subsample``): the
                 gradient on a ``theory.gradient_fraction`` sample, the M single-expert losses and the
                 center's on a smaller ``theory.eval_fraction`` sample, used as control variates --
                 the sample's differences L_i - L_center (the same tokens, so low variance),
                 post-stratified by response position (each example's last target, and every
                 other position apart, weighed by their shares of the full eval set's targets),
                 added to the center's loss on the full eval set (the gradient sample's loss plus
                 one forward pass over the rest). Its backward runs in ``theory.backward_dtype`` (auto: bf16
                 from 100M parameters where the hardware multiplies bf16 natively; the losses stay
                 fp32). With both
                 fractions 1 and a float32 backward it is ``weights`` exactly.

Only linear merges (average, task_arithmetic) are predicted; other methods are listed as out of scope.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mergelaws.errors import ConfigError, MethodError
from mergelaws.theory import predict as P
from mergelaws.theory.quantities import (
    DomainQuantities,
    Expansion,
    complement,
    gradient_at,
    gram_at,
    losses_at,
    macro,
    n_strata,
    poststratified_difference,
    resolve_backward_dtype,
    stack_vectors,
    stratified_losses_at,
    stratum_counts,
    stream_positions,
    subsample,
    sweep_positions,
    weight_gram,
    widen_strata,
)

VARIANTS = ("theta0", "center", "calibrated", "weights", "sampled")
#: the sampled variant's settings when the config has none (the schema's defaults)
SAMPLE_DEFAULTS = {"eval_fraction": 0.125, "gradient_fraction": 0.5, "sample_seed": 0, "backward_dtype": "auto"}
PRED_COLUMNS = ["size", "params", "method", "variant", "k", "subset", "members", "eval_domain", "in_domain", "loss",
                "status"]


@dataclass
class SizeInputs:
    size: str
    model: object
    pad_id: int
    base: dict
    vectors: list
    experts: list[str]
    evalsets: dict
    n_params: int
    load_seconds: float


@dataclass
class VariantResult:
    """One variant's per-domain quantities for one method, and what it cost."""

    method: str
    variant: str
    beta0: np.ndarray
    domains: dict[str, DomainQuantities]
    seconds: float
    forward_equivalents: float  # passes over the sweep's padded eval positions, a backward or JVP tangent as 2
    scales: dict[str, list[float]] = field(default_factory=dict)  # calibration s per domain
    sample: dict = field(default_factory=dict)  # the sampled variant's eval sample and its cost items


def load_inputs(cfg: dict, size: str, expert_dirs: dict[str, str] | None = None, log=print) -> SizeInputs:
    """The base, the task vectors (fp32) and the sweep's eval sets of one size."""
    import torch

    from mergelaws import grid, models, sweep

    if size not in grid.sizes(cfg):
        raise ConfigError(f"size '{size}' is not in the config's bases ({', '.join(grid.sizes(cfg))}); "
                          f"pass one of them with --size")
    t0 = time.time()
    base_path = grid.base_dir(cfg, size)
    tok = models.load_tokenizer(base_path)
    model = models.load_model(base_path, "float32", "cpu", allow_bin=cfg["allow_bin_checkpoints"])
    base = {n: p.detach().clone() for n, p in models.float_state(model).items()}
    experts = grid.domains(cfg)
    expert_dirs = expert_dirs or {d: grid.expert_dir(cfg, size, d) for d in experts}
    vectors = []
    for d in experts:
        # as the sweep reads them: through memory maps where the expert's safetensors hold the
        # model's tensor names (checked from headers; no transformers model built, so M experts
        # cost M task vectors), else loaded through transformers and checked after loading
        src = sweep._open(expert_dirs[d])
        if src is not None and all(n in src for n in base):
            cuts = models.check_expert_files(model, expert_dirs[d])
            vectors.append({n: src.get(n)[:cuts[n] if n in cuts else None].float() - base[n] for n in base})
            del src
            continue
        em = models.load_model(expert_dirs[d], "float32", "cpu", allow_bin=cfg["allow_bin_checkpoints"])
        cuts = models.check_compatible(model, em, expert_dirs[d], allow_vocab_growth=True)
        st = models.float_state(em)
        vectors.append({n: (st[n].detach()[:cuts[n]] if n in cuts else st[n].detach()) - base[n] for n in base})
        del em, st
    stack_vectors(vectors)
    with torch.no_grad():
        evalsets = {d: enc.examples for d, enc in sweep.load_eval_sets(cfg, tok, log).items()}
    return SizeInputs(size, model, tok.pad_token_id, base, vectors, experts, evalsets, models.count_params(model),
                      time.time() - t0)


def linear_methods(cfg: dict, methods: list[str] | None) -> tuple[list[str], list[str]]:
    """(methods predicted, methods out of scope) among ``methods`` (default: the config's)."""
    methods = methods or list(cfg["methods"])
    unknown = [m for m in methods if m not in cfg["methods"]]
    if unknown:
        raise MethodError(f"method(s) {unknown} are not in the config's methods ({', '.join(cfg['methods'])})")
    inside = [m for m in methods if m in P.LINEAR_METHODS]
    if not inside:
        raise MethodError(f"none of {methods} is a linear merge; `mergelaws predict` predicts average and "
                          f"task_arithmetic only (Theorem 3.1 is exact for them)")
    return inside, [m for m in methods if m not in P.LINEAR_METHODS]


def sample_settings(cfg: dict, eval_fraction: float | None = None, gradient_fraction: float | None = None,
                    seed: int | None = None, backward_dtype: str | None = None) -> dict:
    """The sampled variant's settings: the config's ``theory`` keys, each overridden when given
    (``backward_dtype`` as given: ``compute_variants`` resolves auto for the model)."""
    th = {**SAMPLE_DEFAULTS, **{k: v for k, v in (cfg.get("theory") or {}).items() if k in SAMPLE_DEFAULTS}}
    for key, value in (("eval_fraction", eval_fraction), ("gradient_fraction", gradient_fraction),
                       ("sample_seed", seed), ("backward_dtype", backward_dtype)):
        if value is not None:
            th[key] = value
    for key in ("eval_fraction", "gradient_fraction"):
        if not 0 < float(th[key]) <= 1:
            raise ConfigError(f"theory.{key} must be in (0, 1], got {th[key]}")
    if int(th["sample_seed"]) < 0:
        raise ConfigError(f"theory.sample_seed (--sample-seed) must be a non-negative integer, got {th['sample_seed']}")
    if th["backward_dtype"] not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"theory.backward_dtype (--backward-dtype) must be auto, float32 or bfloat16, "
                          f"got {th['backward_dtype']}")
    return {"eval_fraction": float(th["eval_fraction"]), "gradient_fraction": float(th["gradient_fraction"]),
            "sample_seed": int(th["sample_seed"]),
            "backward_dtype": th["backward_dtype"]}


def compute_variants(cfg: dict, inp: SizeInputs, methods: list[str], variants=VARIANTS, log=print,
                     sample: dict | None = None) -> list[VariantResult]:
    """Every requested variant for every linear method (theta_0's Gram is shared by the methods).

    Each result's ``seconds`` is the measured time of everything it uses (a computation shared with
    another variant, through the cache, counts in full for each), and ``forward_equivalents`` the
    same work in passes over the full eval set: padded positions through the model over those of
    one merge's evaluation in the sweep (a backward counted as 2, a JVP tangent as 2)."""
    M, out, cache = len(inp.experts), [], {}
    kw = dict(pad_id=inp.pad_id, experts=inp.experts, batch_tokens=cfg["eval"]["batch_tokens"])
    tokens = sweep_positions(inp.evalsets, kw["batch_tokens"])

    def fe(x: Expansion) -> float:  # forward-equivalents: one primal + M tangents (x2) per pass
        return (x.forward_tokens / max(M, 1) * (1 + 2 * M)) / tokens if x.jvp_passes else x.forward_tokens / tokens * 3

    def get(key, fn):
        if key not in cache:
            t = time.time()
            cache[key] = (fn(), time.time() - t)
            log(f"predict {inp.size}: {key[0]} at {key[1]} in {cache[key][1]:.1f}s")
        return cache[key]

    if "sampled" in variants:
        sample = dict(sample or sample_settings(cfg))
        sample["backward_dtype"] = resolve_backward_dtype(sample["backward_dtype"], "cpu", inp.n_params)
        t = time.time()
        samples = {key: subsample(inp.evalsets, sample[key], sample["sample_seed"])
                   for key in ("eval_fraction", "gradient_fraction")}
        draw_seconds = time.time() - t

    def k1_losses(coef1, evalsets):
        return get(("k=1 losses", f"coef {coef1:g}"), lambda: losses_at(
            inp.model, inp.base, inp.vectors, coef1 * np.eye(M), evalsets, pad_id=inp.pad_id,
            batch_tokens=cfg["eval"]["batch_tokens"]))

    for method in methods:
        params = cfg["methods"][method]
        beta_c = P.center_beta(method, params, M)
        coef1 = P.coefficient(method, params, 1)
        for v in variants:
            if v == "theta0":
                x, s = get(("gram", "theta0"), lambda: gram_at(inp.model, inp.base, inp.vectors, inp.evalsets,
                                                                point="theta0", **kw))
                out.append(VariantResult(method, v, x.beta0, x.domains, s, fe(x)))
                continue
            ck = f"center c={beta_c[0] * M:g}"
            if v in ("center", "calibrated"):
                x, s = get(("gram", ck), lambda: gram_at(inp.model, inp.base, inp.vectors, inp.evalsets,
                                                          beta0=beta_c, point="center", **kw))
            elif v == "weights":
                x, s = get(("gradient", ck), lambda: gradient_at(inp.model, inp.base, inp.vectors, inp.evalsets,
                                                                  beta0=beta_c, point="center", **kw))
            else:  # sampled
                out.append(_sampled(inp, method, beta_c, coef1, sample, samples, draw_seconds, tokens, get, fe,
                                    k1_losses, kw))
                continue
            res = VariantResult(method, v, beta_c, x.domains, s, fe(x))
            if v in ("calibrated", "weights"):
                k1, s1 = k1_losses(coef1, inp.evalsets)
                res.seconds += s1
                res.forward_equivalents += M * stream_positions(inp.evalsets, kw["batch_tokens"]) / tokens
                doms = {}
                for j, d in enumerate(inp.evalsets):
                    doms[d], sc = P.calibrate(x.domains[d], beta_c, coef1, k1[:, j])
                    res.scales[d] = sc.round(4).tolist()
                res.domains = doms
            out.append(res)
    return out


def _sampled(inp: SizeInputs, method, beta_c, coef1, sample, samples, draw_seconds, tokens, get, fe, k1_losses,
             kw) -> VariantResult:
    """The sampled variant of one method (see the module's docstring): ``weights`` with its gradient on
    the gradient sample, its single-expert losses from the eval sample by control variates, its
    level the full set's center loss. Every pass it makes counts in its seconds and forward-equivalents."""
    M = len(inp.experts)
    ck = f"center c={beta_c[0] * M:g}"
    seed = sample["sample_seed"]
    sub_g, sub_k = samples["gradient_fraction"], samples["eval_fraction"]

    def tag(key):
        return "" if samples[key] is inp.evalsets else f" on {sample[key]:g} of the eval examples (seed {seed})"

    def n_tok(sets):
        return sum(e.n_targets for ex in sets.values() for e in ex)

    def n_pos(sets):
        return stream_positions(sets, kw["batch_tokens"])

    # the eval sample inside the gradient sample (one seed, eval_fraction <= gradient_fraction): the
    # center's loss on it comes from the gradient's forward passes
    nested = sub_k is not inp.evalsets and all({id(e) for e in sub_k[d]} <= {id(e) for e in sub_g[d]}
                                                for d in inp.evalsets)
    low = sample["backward_dtype"]
    x, s = get(("gradient", ck + tag("gradient_fraction") + (f", with{tag('eval_fraction')}" if nested else "")
                + ("" if low == "float32" else f", {low} backward")),
               lambda: gradient_at(inp.model, inp.base, inp.vectors, sub_g, beta0=beta_c, point="center",
                                   part=sub_k if nested else None, backward_dtype=low, **kw))
    res = VariantResult(method, "sampled", beta_c, {}, s + draw_seconds, fe(x))
    items = {"gradient_and_gram": round(s, 3), "draw": round(draw_seconds, 4)}
    level = np.array([x.domains[d].loss for d in inp.evalsets])
    if sub_g is not inp.evalsets:  # the center's full-set loss: the gradient sample's plus the rest's
        rest = complement(inp.evalsets, sub_g)
        lr, s2 = get(("loss", ck + " on the rest of the gradient sample" + tag("gradient_fraction")), lambda: losses_at(
            inp.model, inp.base, inp.vectors, [beta_c], rest, pad_id=inp.pad_id, batch_tokens=kw["batch_tokens"]))
        n_rest = np.array([sum(e.n_targets for e in rest[d]) for d in inp.evalsets], dtype=float)
        n_g = np.array([x.domains[d].tokens for d in inp.evalsets], dtype=float)
        level = (level * n_g + np.nan_to_num(lr[0]) * n_rest) / (n_g + n_rest)
        res.seconds += s2
        res.forward_equivalents += n_pos(rest) / tokens
        items["center_loss_rest"] = round(s2, 3)
    if sub_k is inp.evalsets:
        k1, s1 = k1_losses(coef1, inp.evalsets)
        res.seconds += s1
        res.forward_equivalents += M * n_pos(sub_k) / tokens
    else:  # the M single-expert merges and the center on the same sample: control variates, by stratum
        points = [*(coef1 * np.eye(M))] + ([] if nested else [beta_c])
        (sums, counts), s1 = get(("k=1" + ("" if nested else " and center") + " losses by response stratum",
                                  f"coef {coef1:g}" + ("" if nested else f", {ck}") + tag("eval_fraction")),
                                 lambda: stratified_losses_at(inp.model, inp.base, inp.vectors, points, sub_k,
                                                              pad_id=inp.pad_id, batch_tokens=kw["batch_tokens"]))
        width = n_strata(e for ex in inp.evalsets.values() for e in ex)
        center = np.array([widen_strata(x.part_strata[d][0], width) for d in inp.evalsets]) if nested else sums[M]
        full = np.array([stratum_counts(inp.evalsets[d], width) for d in inp.evalsets])
        # each single's loss: the full set's center loss plus the sample's difference to the center
        k1 = level[None] + poststratified_difference(sums[:M], center, counts, full)
        res.seconds += s1
        res.forward_equivalents += len(points) * n_pos(sub_k) / tokens
    items["single_expert_losses"] = round(s1, 3)
    for j, d in enumerate(inp.evalsets):
        q = x.domains[d]
        if sub_g is not inp.evalsets:
            q = DomainQuantities(d, q.tokens, float(level[j]), q.a, q.G)
        res.domains[d], sc = P.calibrate(q, beta_c, coef1, k1[:, j])
        res.scales[d] = sc.round(4).tolist()
    res.sample = {**sample,
                  "examples": {d: len(sub_k[d]) for d in inp.evalsets},
                  "gradient_examples": {d: len(sub_g[d]) for d in inp.evalsets},
                  "examples_full": {d: len(ex) for d, ex in inp.evalsets.items()},
                  "token_fraction": round(n_tok(sub_k) / n_tok(inp.evalsets), 4),
                  "gradient_token_fraction": round(n_tok(sub_g) / n_tok(inp.evalsets), 4),
                  "position_fraction": round(n_pos(sub_k) / tokens, 4), "seconds_by_item": items}
    return res


def predictions_table(cfg: dict, inp: SizeInputs, results: list[VariantResult]) -> pd.DataFrame:
    """Every grid subset's predicted loss on every eval domain, by method and variant."""
    from mergelaws import grid

    rows = []
    for r in results:
        params = cfg["methods"][r.method]
        for s in grid.subsets(cfg, inp.size):
            d = P.subset_beta(s.members, inp.experts, P.coefficient(r.method, params, s.k)) - r.beta0
            for dom, q in r.domains.items():
                rows.append((inp.size, inp.n_params, r.method, r.variant, s.k, s.id, s.label, dom, dom in s.members,
                             P.quadratic_loss(q, d), "ok"))
    return pd.DataFrame(rows, columns=PRED_COLUMNS)


def summary(cfg: dict, inp: SizeInputs, results: list[VariantResult], out_of_scope: list[str]) -> dict:
    """Per method and variant: the theorem's terms (macro), the exact finite-pool E[L|k] and the
    variance across all k-subsets (cross_domain view); diagnostics of the task vectors."""
    M = len(inp.experts)
    G = weight_gram(inp.vectors, list(inp.base))  # per tensor: no flat copy of the task vectors
    norms = np.sqrt(np.diag(G))
    cos = G / np.outer(norms, norms)
    mu2 = float(G.sum()) / M ** 2  # |mu|^2 = 1^T G 1 / M^2
    diag = {"experts": inp.experts, "norm_mu": float(np.sqrt(max(mu2, 0.0))),
            "trace_sigma": float(np.diag(G).mean() - mu2),  # mean |v_i - mu|^2
            "norm_v": norms.round(6).tolist(), "cosine": cos.round(4).tolist()}
    methods = {}
    for r in results:
        params = cfg["methods"][r.method]
        c = P.coefficient(r.method, params, M) * M
        q = macro(r.domains)
        terms = P.theorem_terms(q, r.beta0, c)
        ks = list(range(M + 1))
        coefs = [P.coefficient(r.method, params, k) for k in ks]
        entry = {"c": c, "seconds": round(r.seconds, 3), "forward_equivalents": round(r.forward_equivalents, 2),
                 "L_expansion": q.loss, "theorem": asdict(terms),
                 "expected": [P.expected_loss(q, r.beta0, cf, k) for k, cf in zip(ks, coefs)],
                 "variance": [P.subset_variance(q, r.beta0, cf, inp.experts, k) if 0 < k < M else 0.0
                              for k, cf in zip(ks, coefs)]}
        if r.variant in ("theta0", "center"):
            G = q.G
            dg = np.sqrt(np.clip(np.diag(G), 1e-30, None))
            entry["h_similarity"] = (G / np.outer(dg, dg)).round(4).tolist()
        if r.scales:
            entry["calibration_scales"] = r.scales
        if r.sample:
            entry["sample"] = r.sample
        methods.setdefault(r.method, {})[r.variant] = entry
    return {"size": inp.size, "params": inp.n_params, "M": M, "load_seconds": round(inp.load_seconds, 2),
            "diagnostics": diag, "methods": methods,
            "out_of_scope": {m: "not a linear merge: Theorem 3.1's quadratic model is exact for average and "
                                "task_arithmetic only; TIES/DARE change mu, Sigma and their alignment with the "
                                "curvature, which this command does not model" for m in out_of_scope}}


def sweep_cost(log_dir: str | Path, size: str, method: str) -> tuple[float | None, int | None, float | None]:
    """(seconds, merges, load seconds) of the sweep of (size, method), summed over its shards' logs
    (the last such lines of each): its logged time, which includes loading the base, the experts and
    the eval sets, the merges it evaluated, and that loading's own time; Nones without logs."""
    files = sorted(Path(log_dir, size, method).glob("*.log"))
    total, merges, load = None, None, None
    for f in files:
        text = f.read_text(errors="replace")
        m = re.findall(r"(\d+) merges evaluated \(\d+ in the table\) in ([0-9.]+)s", text)
        if m:
            total = (total or 0.0) + float(m[-1][1])
            merges = (merges or 0) + int(m[-1][0])
            loaded = re.findall(r"eval domains; loaded in ([0-9.]+)s", text)
            if loaded:
                load = (load or 0.0) + float(loaded[-1])
    return total, merges, load


def sweep_seconds(log_dir: str | Path, size: str, method: str) -> float | None:
    """The sweep's own time for (size, method), summed over its shards' logs, else None."""
    return sweep_cost(log_dir, size, method)[0]


def run_predict(cfg: dict, size: str, out: str | Path, methods: list[str] | None = None, variants=VARIANTS,
                losses: str | Path | None = None, sweep_logs: str | Path | None = None,
                expert_dirs: dict[str, str] | None = None, log=print, eval_fraction: float | None = None,
                gradient_fraction: float | None = None, sample_seed: int | None = None,
                backward_dtype: str | None = None) -> dict:
    """`mergelaws predict`: writes ``out`` (per-subset predictions, parquet), ``out``.json (summary)
    and, given a losses table, ``<out>_compare.csv`` (+ .parquet) and ``<out>_compare.png``.
    ``eval_fraction``, ``gradient_fraction``, ``sample_seed``, ``backward_dtype`` override the config's
    theory keys (sampled)."""
    from mergelaws import grid, io
    from mergelaws.sweep import write_table
    from mergelaws.theory import score as S

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    inside, outside = linear_methods(cfg, methods)
    sample = sample_settings(cfg, eval_fraction, gradient_fraction, sample_seed, backward_dtype)
    table = None
    if losses is not None:
        table = io.read_table(losses, "losses table", ["size", "method", "k", "subset", "eval_domain", "loss"],
                              "pass the losses table `mergelaws aggregate` writes (results/losses.parquet)")
    t0 = time.time()
    inp = load_inputs(cfg, size, expert_dirs, log)
    results = compute_variants(cfg, inp, inside, variants, log, sample=sample)
    pred = predictions_table(cfg, inp, results)
    summ = summary(cfg, inp, results, outside)
    summ["seconds"] = round(time.time() - t0, 2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table(pred, out)
    if table is not None:
        logs = Path(sweep_logs) if sweep_logs else grid.results_dir(cfg) / "logs" / "sweep"
        cost = {m: sweep_cost(logs, size, m) for m in inside}
        scores = S.scores_frame(S.score(pred, table, summ, {m: c[0] for m, c in cost.items()},
                                        {m: c[1] for m, c in cost.items()}, {m: c[2] for m, c in cost.items()}))
        summ["scores"] = scores.to_dict(orient="records")
        stem = out.with_suffix("")
        write_table(scores, Path(f"{stem}_compare.parquet"), csv=True)
        fig = S.figure(pred, table, size, Path(f"{stem}_compare.png"), method=inside[0])
        for r in scores.itertuples():
            log(f"predict {size}/{r.method}/{r.variant}: Spearman {r.spearman:.3f} (k>=2 {r.spearman_k2:.3f}), "
                f"curve MAE {r.curve_mae:.4f}, drop {r.drop_predicted:.3f} vs {r.drop_measured:.3f} measured, "
                f"variance ratio {r.variance_ratio:.2f}, {r.seconds:.1f}s = {r.compute_fraction:.1%} of the sweep "
                f"({r.compute_fraction_no_load:.1%} of its merging and evaluating, {r.forward_fraction:.1%} in "
                f"forward passes; {r.compute_fraction_enumeration:.2%} of an estimated full enumeration of the "
                f"{r.enumeration_subsets} subsets)")
        if fig:
            log(f"predict {size}: figure -> {fig}")
    io.write_text(out.with_suffix(".json"), json.dumps(summ, indent=1, default=_jsonable) + "\n")
    for m in outside:
        log(f"predict {size}: {m} not predicted ({summ['out_of_scope'][m]})")
    log(f"predict {size}: {len(pred)} predicted rows -> {out} (+ {out.with_suffix('.json').name})")
    return summ


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)
