"""The quantities of Theorem 3.1 (PAPER Sec 3) on the sweep's own eval tokens.

For task vectors v_i = theta_i - theta_0 (i = 1..M) and an expansion point
theta_e = theta_0 + sum_i beta0_i v_i, per eval domain:

* ``loss``  L(theta_e): response-only, token-weighted CE in nats per target token;
* ``a_i``   g^T v_i, g the gradient of that loss at theta_e;
* ``G_ij``  v_i^T H v_j, H the Gauss-Newton matrix of that loss at theta_e.

With u_i = J v_i the directional derivative of the target-position logits (one forward-mode
pass, ``torch.func.jvp`` through ``functional_call``) and p the softmax at theta_e, per target
token t:  g^T v_i = p^T u_i - u_i[target]  and  v_i^T H v_j = sum_v p u_i u_j - (p^T u_i)(p^T u_j)
(the CE Hessian in logit space is diag(p) - p p^T), each divided by the domain's target tokens.
M experts cost M JVP passes (primal + tangent) over the eval tokens; sums accumulate in float64.
``finite_difference_logits`` is the cross-check of u_i by a central difference.
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, jvp, vmap

from mergelaws.data import IGNORE, Example, eval_batches, pad_batch

#: fp32 dot products over blocks of this many entries, the blocks summed in float64
DOT_BLOCK = 1 << 14


def padded_positions(examples: list[Example], batch_tokens: int) -> int:
    """Positions a forward pass over ``examples`` computes in ``eval_batches``, padding included
    (a 1/8 sample of SmolLM2's eval set, 18 examples, would be one batch of 3,906 positions for
    1,969 tokens without the padding cut; with it, 2,092)."""
    return sum(max(len(e) for e in b) * len(b) for b in eval_batches(examples, batch_tokens))


def stream_positions(evalsets: dict[str, list[Example]], batch_tokens: int) -> int:
    """Padded positions of one pass of ``losses_at`` over ``evalsets`` (all domains in one stream)."""
    return padded_positions([e for ex in evalsets.values() for e in ex], batch_tokens)


def sweep_positions(evalsets: dict[str, list[Example]], batch_tokens: int) -> int:
    """Padded positions of one merge's evaluation in the sweep (each domain's examples batched apart,
    as ``evaluate_examples`` does): the unit of forward-pass cost."""
    return sum(padded_positions(ex, batch_tokens) for ex in evalsets.values() if ex)


def blocked_dot(x: torch.Tensor, y: torch.Tensor, block: int = DOT_BLOCK) -> float:
    """x . y of two fp32 tensors of one size, as float64: fp32 products summed in blocks of
    ``block`` entries (one batched matmul), the blocks' sums added in float64 -- as accurate as a
    float64 dot to ~1e-6 relative and ~20x faster, with no float64 copy of either."""
    x, y = x.reshape(-1), y.reshape(-1)
    nb = x.numel() // block
    head = nb * block
    # y as a transposed (nb, 1, block) view: ~6x faster on CPU than the same (nb, block, 1) view
    out = torch.bmm(x[:head].view(nb, 1, block), y[:head].view(nb, 1, block).transpose(1, 2)).double().sum() if nb else 0.0
    if head < x.numel():
        out = out + x[head:].double() @ y[head:].double()
    return float(out)


def blocked_matmul(x: torch.Tensor, y: torch.Tensor, block: int = DOT_BLOCK) -> np.ndarray:
    """x y^T of fp32 (m, n) and (p, n) as float64 (m, p), summed like ``blocked_dot``: one batched
    matmul over blocks of ``block`` columns reads each row once (m dots with one y would read y m
    times)."""
    m, n = x.shape
    nb = n // block
    head = nb * block
    out = torch.zeros(m, y.shape[0], dtype=torch.float64)
    if nb:
        xb = x[:, :head].reshape(m, nb, block).permute(1, 0, 2)
        yb = y[:, :head].reshape(y.shape[0], nb, block).permute(1, 2, 0)
        out += torch.bmm(xb, yb).double().sum(0)
    if head < n:
        out += x[:, head:].double() @ y[:, head:].double().T
    return out.numpy()


def stack_vectors(vectors: list[dict[str, torch.Tensor]]) -> None:
    """Makes each of the task vectors' tensors, in place, a row of one (M, ...) stack per name
    (``stacked``), so that the Gram and g^T v_i read a tensor's M vectors in one pass. One tensor
    is stacked at a time (the largest tensor x M of extra memory, briefly)."""
    M = len(vectors)
    for n in (list(vectors[0]) if M else ()):
        st = torch.stack([v[n] for v in vectors])
        for i in range(M):
            vectors[i][n] = st[i]


def stacked(vectors: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor | None:
    """The (M, numel) stack whose rows the M vectors' ``name`` tensors are (``stack_vectors``), else None."""
    M = len(vectors)
    st = vectors[0][name]._base if M else None
    if st is None or st.shape[0] != M or st.shape[1:] != vectors[0][name].shape or not st.is_contiguous():
        return None
    if all(v[name]._base is st and v[name].data_ptr() == st[i].data_ptr() for i, v in enumerate(vectors)):
        return st.view(M, -1)
    return None


@dataclass
class DomainQuantities:
    """Loss, a = (g^T v_i)_i and G = (v_i^T H v_j)_ij of one eval domain at one expansion point."""

    domain: str
    tokens: int
    loss: float
    a: np.ndarray  # (M,)
    G: np.ndarray  # (M, M), symmetric PSD


@dataclass
class Expansion:
    """Every domain's quantities at theta_0 + sum_i beta0_i v_i (``experts`` order the axes)."""

    point: str  # "theta0", "center" (theta_0 + c mu) or a free label
    experts: list[str]
    beta0: np.ndarray  # (M,)
    domains: dict[str, DomainQuantities]
    seconds: float = 0.0
    jvp_passes: int = 0  # one per (expert, batch)
    forward_tokens: int = 0  # padded positions through the model (targets, prompts and padding), times passes
    notes: list[str] = field(default_factory=list)
    part_losses: dict[str, float] = field(default_factory=dict)  # gradient_at(part=...): the part's loss per domain
    # gradient_at(part=...): the part's NLL sums and target counts per response stratum, per domain
    part_strata: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def macro(self) -> DomainQuantities:
        """The all-domain mean (``macro``)."""
        return macro(self.domains)


def macro(domains: dict[str, DomainQuantities]) -> DomainQuantities:
    """The all-domain mean of loss, a and G (each domain weighs the same, as the cross_domain view);
    its tokens are the domains' sum."""
    ds = list(domains.values())
    return DomainQuantities("macro", sum(d.tokens for d in ds), float(np.mean([d.loss for d in ds])),
                            np.mean([d.a for d in ds], 0), np.mean([d.G for d in ds], 0))


def balanced_order(lengths, rng: np.random.Generator) -> list[int]:
    """A random order of ``len(lengths)`` items whose every prefix is spread over the items sorted by
    length: the sorted list is halved, the halves' own orders (recursively) interleaved, the half
    that leads drawn with probability proportional to its size. Any first 2 are one from the shorter
    half and one from the longer, any first 4 one from each quarter, and so on; the first item is
    uniform over all. Ties in length keep the items' order."""
    items = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))

    def order(xs: list[int]) -> list[int]:
        if len(xs) <= 1:
            return xs
        a, b = xs[:len(xs) // 2], xs[len(xs) // 2:]
        if rng.random() < len(b) / len(xs):
            a, b = b, a
        oa, ob = order(a), order(b)
        return [x for pair in zip(oa, ob) for x in pair] + oa[len(ob):] + ob[len(oa):]

    return order(items)


def subsample(evalsets: dict[str, list[Example]], fraction: float, seed: int = 0
              ) -> dict[str, list[Example]]:
    """A seeded sample of each domain's eval examples, stratified per domain and, within a domain, by
    response length: ceil(fraction x n_d) of domain d's n_d examples (at least one), the first ones of
    a ``balanced_order`` of their target counts drawn by a generator seeded with (seed, crc32 of the
    domain's name) -- so a sample of 2 is one shorter and one longer example, a domain's sample does
    not depend on the other domains, and for one seed a smaller fraction's sample is inside a larger
    one's -- kept in their original order. fraction >= 1 returns ``evalsets`` itself (the same lists).

    Why by length: an expert's loss gap to the merge is largest on a response's first tokens and
    shrinks along it, so an example's mean gap falls with its length; a sample of only short (or
    only long) examples would misstate the single-expert losses even after ``poststratified_difference``."""
    if not fraction > 0:
        raise ValueError(f"eval fraction must be > 0, got {fraction}")
    if fraction >= 1:
        return evalsets
    out = {}
    for d, examples in evalsets.items():
        n = len(examples)
        m = min(n, max(1, math.ceil(fraction * n - 1e-9)))
        order = balanced_order([e.n_targets for e in examples],
                               np.random.default_rng([int(seed), zlib.crc32(d.encode())]))
        out[d] = [examples[i] for i in sorted(order[:m])]
    return out


def complement(evalsets: dict[str, list[Example]], sample: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """Each domain's examples that are not in ``sample`` (by identity), in their original order."""
    out = {}
    for d, examples in evalsets.items():
        taken = {id(e) for e in sample.get(d, [])}
        out[d] = [e for e in examples if id(e) not in taken]
    return out


class eager_attention:
    """Within the block, the model's attention is the eager implementation: forward-mode AD has
    no rule for the fused SDPA kernels. Restored on exit."""

    def __init__(self, model):
        self.model = model
        self.saved = getattr(model.config, "_attn_implementation", None)

    def __enter__(self):
        if self.saved not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("eager")
        return self.model

    def __exit__(self, *exc):
        if self.saved not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(self.saved)
        return False


class _Bf16BackwardLinear(torch.autograd.Function):
    """y = x W^T + b in the input's dtype (the forward is unchanged); the backward's matmuls in
    bfloat16, with W as ``hilo`` = [hi; lo], W = hi + lo in two bf16 parts made once per point (W to
    about 2^-16, where bf16 alone would move a merge's point by up to half its weights' ulp):
    dL/dx = [g, g] [hi; lo], one matmul with one rounding of its output. ``tap`` (a
    ``DeferredWeightGrads`` and the weight's name): dL/dW is not formed here but left to the tap,
    which gets this batch's bf16 rows of g and x."""

    @staticmethod
    def forward(ctx, x, weight, bias, hilo, tap):
        ctx.save_for_backward(x, hilo)
        ctx.has_bias = bias is not None
        ctx.tap = tap
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, hilo = ctx.saved_tensors
        g16 = grad.to(torch.bfloat16)
        if ctx.needs_input_grad[0]:
            gx = ((g16 if hilo.shape[0] == g16.shape[-1] else torch.cat([g16, g16], -1)) @ hilo).to(grad.dtype)
        else:
            gx = None
        gw = gb = None
        if ctx.needs_input_grad[1]:
            g2, x2 = g16.reshape(-1, g16.shape[-1]), x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            if ctx.tap is not None:
                ctx.tap[0].add(ctx.tap[1], g2, x2)
            else:
                gw = (g2.T @ x2).to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gw, gb, None, None


class DeferredWeightGrads:
    """The linear layers' dL/dW summed over many backward passes without a weight-sized tensor per
    pass: each pass leaves its bf16 rows of g and x per weight, and ``take`` forms dL/dW = G^T X by one
    matmul per weight over all of them (also whenever the rows held pass ``budget`` bytes, the result
    summed in fp32). Per batch, forming and accumulating dL/dW costs a read and write of every weight;
    the eval sets' short batches made that most of the backward's non-matmul time."""

    def __init__(self, budget: int = 1 << 30):
        self.budget, self.bytes = budget, 0
        self.rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        self.rows.setdefault(name, []).append((g, x))
        self.bytes += (g.numel() + x.numel()) * g.element_size()
        if self.bytes > self.budget:
            self.flush()

    def flush(self) -> None:
        for name, parts in self.rows.items():
            g = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
            x = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
            dw = (g.T @ x).float()
            if name in self.sums:
                self.sums[name] += dw
            else:
                self.sums[name] = dw
        self.rows, self.bytes = {}, 0

    def take(self) -> dict[str, torch.Tensor]:
        """dL/dW per weight name since the last take (fp32), and a fresh start."""
        self.flush()
        out, self.sums = self.sums, {}
        return out


def _bf16_backward_forward(mod: torch.nn.Linear, hilo: torch.Tensor, tap, x: torch.Tensor) -> torch.Tensor:
    return _Bf16BackwardLinear.apply(x, mod.weight, mod.bias, hilo, tap)


class bf16_backward:
    """Within the block, every ``nn.Linear`` of ``model`` runs its backward's matmuls in bfloat16
    (``_Bf16BackwardLinear``; the forward, hence every loss, is unchanged, and the gradient carries
    the rounding of bf16 activations and output gradients). The weights' bf16 parts are made on
    entry: set the point first. Restored on exit.

    ``defer``: the linear weights' gradients go to ``self.deferred`` (a ``DeferredWeightGrads``,
    keyed by the parameter's name in ``model.named_parameters()``) instead of their ``.grad``, and
    every ``nn.Embedding`` gives a sparse gradient (the rows of the batch's tokens, not a dense
    vocabulary-sized tensor per batch).

    ``split`` False: the backward's weights are their bf16 part alone, one matmul instead of two.
    On SmolLM2 that made the gradient ~20% faster and moved g^T v_i by up to 0.6% of a domain's
    largest (2e-5 with the split), and the 66-merge design's Spearman (k >= 2) by -0.001 to
    -0.005: not the default."""

    def __init__(self, model, enabled: bool = True, defer: bool = False, split: bool = True):
        self.split = split
        self.mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)] if enabled else []
        self.embeddings = ([m for m in model.modules() if isinstance(m, torch.nn.Embedding) and not m.sparse]
                           if enabled and defer else [])
        self.deferred = DeferredWeightGrads() if enabled and defer else None
        self.names = {id(p): n for n, p in model.named_parameters()} if enabled and defer else {}

    def __enter__(self):
        parts = {}  # tied weights (a tied LM head) share one split
        for m in self.mods:
            key = m.weight.data_ptr()
            if key not in parts:
                w = m.weight.detach()
                hi = w.to(torch.bfloat16)
                parts[key] = torch.cat([hi, (w - hi.to(w.dtype)).to(torch.bfloat16)]) if self.split else hi
            tap = (self.deferred, self.names[id(m.weight)]) if self.deferred is not None else None
            m.forward = functools.partial(_bf16_backward_forward, m, parts[key], tap)
        for m in self.embeddings:
            m.sparse = True
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            del m.forward
        for m in self.embeddings:
            m.sparse = False
        return False


#: ``auto`` takes the bf16 backward from this many parameters on: on this project's 2-core CPU with
#: AMX it made SmolLM2-135M's gradient 10-15% faster, and the default's tiny bases' slower (the
#: conversions cost more than their small matmuls save)
BF16_BACKWARD_MIN_PARAMS = 100_000_000


def resolve_backward_dtype(name: str, device: str | torch.device = "cpu", n_params: int = 0) -> str:
    """``auto``: bfloat16 for a model of ``BF16_BACKWARD_MIN_PARAMS`` or more on a device that
    multiplies bf16 natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else float32;
    ``float32``/``bfloat16`` as given."""
    if name != "auto":
        return name
    if n_params < BF16_BACKWARD_MIN_PARAMS:
        return "float32"
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    cpu = torch.cpu
    fast = any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bfloat16" if fast else "float32"


def target_logits_fn(model, ids: torch.Tensor, att: torch.Tensor, lab: torch.Tensor):
    """(params -> fp32 logits at the labelled target positions, targets) for one padded batch."""
    mask = lab[:, 1:] != IGNORE
    targets = lab[:, 1:][mask]

    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(model, params, (), {"input_ids": ids, "attention_mask": att})
        return out.logits[:, :-1][mask].float()

    return f, targets


def point_params(base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
                 beta0) -> dict[str, torch.Tensor]:
    """theta_0 + sum_i beta0_i v_i in fp32 (the order of ``vectors`` is the experts')."""
    out = {}
    for n, b in base.items():
        t = b.detach().float().clone()
        for w, v in zip(beta0, vectors):
            if w:
                t.add_(v[n], alpha=float(w))
        out[n] = t
    return out


@torch.no_grad()
def set_point(live: dict[str, torch.Tensor], base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
              beta0) -> None:
    """Writes ``point_params(base, vectors, beta0)`` into the model's parameters ``live`` (the same
    float ops, so the same bits), tensor by tensor in place: no second copy of the model."""
    for n, b in base.items():
        t = live[n]
        t.copy_(b)
        for w, v in zip(beta0, vectors):
            if w:
                t.add_(v[n].to(t.device), alpha=float(w))


def gram_at(model, base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
            evalsets: dict[str, list[Example]], *, pad_id: int, beta0=None, experts: list[str] | None = None,
            point: str = "theta0", batch_tokens: int = 8192, device: str | torch.device = "cpu") -> Expansion:
    """The quantities of every domain at theta_0 + sum_i beta0_i v_i (beta0 = 0: theta_0).

    ``model``: a module of the base's architecture (its own weights are not used);
    ``base`` / ``vectors``: fp32 tensors by ``float_state`` name (task vectors theta_i - theta_0)."""
    M = len(vectors)
    beta0 = np.zeros(M) if beta0 is None else np.asarray(beta0, dtype=float)
    experts = list(experts or [f"e{i}" for i in range(M)])
    t0 = time.time()
    was_training = model.training
    model.eval()
    params = {n: t.to(device) for n, t in point_params(base, vectors, beta0).items()}
    tangents = [{n: v[n].to(device) for n in params} for v in vectors]
    names = list(evalsets)
    tagged = [Example(e.input_ids, e.labels) for d in names for e in evalsets[d]]
    tag = {id(e): j for j, e in enumerate(tagged)}
    owner = [j for j, d in enumerate(names) for _ in evalsets[d]]
    D = len(names)
    nll, n_tok, a, G = np.zeros(D), np.zeros(D, dtype=np.int64), np.zeros((D, M)), np.zeros((D, M, M))
    passes = fwd = 0
    with eager_attention(model):  # every domain's examples in one length-bucketed stream
        for batch in eval_batches(tagged, batch_tokens):
            ids, att, lab = (t.to(device) for t in pad_batch(batch, pad_id))
            f, targets = target_logits_fn(model, ids, att, lab)
            if targets.numel() == 0:
                continue
            per_row = (lab[:, 1:] != IGNORE).sum(1).tolist()
            rows = torch.tensor([owner[tag[id(e)]] for e, r in zip(batch, per_row) for _ in range(r)])
            for j, (s, ab, Gb, n) in batch_terms(f, params, tangents, targets, rows).items():
                nll[j], n_tok[j], a[j], G[j] = nll[j] + s, n_tok[j] + n, a[j] + ab, G[j] + Gb
            passes += max(M, 1)
            fwd += ids.numel() * max(M, 1)
    out = {}
    for j, d in enumerate(names):
        n = max(int(n_tok[j]), 1)
        out[d] = DomainQuantities(d, int(n_tok[j]), nll[j] / n if n_tok[j] else float("nan"), a[j] / n,
                                  (G[j] + G[j].T) / (2 * n))
    model.train(was_training)
    return Expansion(point, experts, beta0, out, seconds=time.time() - t0, jvp_passes=passes, forward_tokens=fwd)


def batch_terms(f, params: dict[str, torch.Tensor], tangents: list[dict[str, torch.Tensor]],
                targets: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 16
                ) -> dict[int, tuple[float, np.ndarray, np.ndarray, int]]:
    """Per group of target rows (``rows``: a group id per target; default one group 0):
    (summed NLL, sum_t (p^T u_i - u_i[target]), sum_t u_i^T (diag p - p p^T) u_j, targets) of one
    batch. The tangents go through ``vmap`` in chunks of ``chunk`` (one primal, batched tangents)."""
    M = len(tangents)
    rows = torch.zeros(len(targets), dtype=torch.long) if rows is None else rows
    with torch.no_grad():
        logits = f(params)
    logp = torch.log_softmax(logits, -1)
    tok_nll = -logp.gather(1, targets[:, None])[:, 0].double()
    U = []
    for i in range(0, M, chunk):
        part = tangents[i:i + chunk]
        stacked = {n: torch.stack([t[n] for t in part]) for n in params}
        U.append(vmap(lambda t: jvp(f, (params,), (t,))[1])(stacked).detach())
    out = {}
    if M:
        U = torch.cat(U)  # (M, T, V)
        p = logp.exp()
        pu = (U * p).sum(-1).double()  # (M, T)
        ga = pu - U.gather(2, targets[None, :, None].expand(M, -1, 1))[..., 0].double()
        S = (U * p.sqrt()).double()  # (M, T, V)
    for j in torch.unique(rows).tolist():
        sel = rows == j
        n = int(sel.sum())
        if not M:
            out[j] = (float(tok_nll[sel].sum()), np.zeros(0), np.zeros((0, 0)), n)
            continue
        Sj = S[:, sel].reshape(M, -1)
        G = Sj @ Sj.T - pu[:, sel] @ pu[:, sel].T
        out[j] = (float(tok_nll[sel].sum()), ga[:, sel].sum(1).cpu().numpy(), G.cpu().numpy(), n)
    return out


# Response strata of the sampled variant's single-expert estimate: stratum 0 is each example's last
# target, stratum 1 + p its target at position p (p = 0, 1, ... among its targets) otherwise. On
# SmolLM2 an expert's loss differs from the merge's most at a response's first tokens (an
# off-domain expert +2.0 nats at the first, +0.2 a token in the body) and less the further along it
# is, so a sample's mean difference depends on how long its examples are; weighing every position
# by its share of the full eval set's targets removes that, and (one token an example per
# stratum) it has none of the bias of a ratio over wider strata: over 400 draws of 2 examples a
# domain the k = 1 -> 9 drop's error fell from 6.8% rms (bias +2.4%) with the first three positions,
# the last and the rest as strata to 5.1% (bias 0.0%).


def n_strata(examples) -> int:
    """Strata for examples of at most this many targets: the last, and one per other position."""
    return max((e.n_targets for e in examples), default=0) + 1


def token_strata(mask: torch.Tensor) -> torch.Tensor:
    """The stratum of each target of ``mask`` (batch x positions, targets True), in ``[mask]``'s
    order: 0 for its row's last target, else 1 + its position among its row's targets."""
    pos = mask.long().cumsum(1) - 1
    last = mask.long().sum(1, keepdim=True) - 1
    return torch.where(pos == last, 0, pos + 1)[mask]


def stratum_counts(examples: list[Example], width: int | None = None) -> np.ndarray:
    """Target tokens per ``token_strata`` stratum over ``examples`` (from their lengths, no pass),
    ``width`` strata (default ``n_strata(examples)``)."""
    out = np.zeros(width or n_strata(examples))
    for e in examples:
        n = e.n_targets
        if n:
            out[0] += 1
            out[1:n] += 1
    return out


def widen_strata(a: np.ndarray, width: int) -> np.ndarray:
    """``a`` (... x strata) with empty strata appended up to ``width``."""
    return np.concatenate([a, np.zeros((*a.shape[:-1], width - a.shape[-1]))], -1) if a.shape[-1] < width else a


def poststratified_difference(point_sums: np.ndarray, center_sums: np.ndarray, counts: np.ndarray,
                              full_counts: np.ndarray) -> np.ndarray:
    """Per point and domain, the sample's mean NLL difference point - center with each stratum
    weighed by its share of the full set's targets (``full_counts``, domains x strata) rather than
    the sample's: ``point_sums`` (points x domains x strata) and ``center_sums`` (domains x strata)
    are NLL sums over the same sampled targets, ``counts`` (domains x strata) their numbers (fewer
    strata than the full set's count as empty). A position the sample does not reach takes the
    difference at the furthest position before it that the sample has (the sample's all-strata
    difference where it has none)."""
    width = max(full_counts.shape[-1], counts.shape[-1])
    point_sums, center_sums, counts, full_counts = (widen_strata(np.asarray(x, float), width) for x in
                                                   (point_sums, center_sums, counts, full_counts))
    diff = point_sums - center_sums[None]
    overall = diff.sum(-1) / np.maximum(counts.sum(-1), 1)[None]
    per = np.where(counts[None] > 0, diff / np.maximum(counts, 1)[None], overall[..., None])
    # positions (strata 1..) the sample lacks: the furthest earlier position it has
    have = np.where(counts[:, 1:] > 0, np.arange(1, width), 0)
    src = np.maximum.accumulate(have, axis=-1)  # domains x (width - 1); 0: no earlier position
    filled = np.take_along_axis(per[..., 1:], np.maximum(src - 1, 0)[None].repeat(len(per), 0), -1)
    per[..., 1:] = np.where(src[None] > 0, filled, overall[..., None])
    w = full_counts / np.maximum(full_counts.sum(-1, keepdims=True), 1)
    return (per * w[None]).sum(-1)


def _stream(evalsets: dict[str, list[Example]], batch_tokens: int, pad_id: int):
    """Every domain's examples in one length-bucketed stream: per padded batch (ids, att, lab, mask
    of the target positions, the domain index of each target, the ``token_strata`` of each target)."""
    names = list(evalsets)
    copies = [(j, Example(e.input_ids, e.labels)) for j, d in enumerate(names) for e in evalsets[d]]
    owner = {id(e): j for j, e in copies}
    out = []
    for batch in eval_batches([e for _, e in copies], batch_tokens):
        ids, att, lab = pad_batch(batch, pad_id)
        mask = lab[:, 1:] != IGNORE
        if not mask.any():
            continue
        rows = torch.tensor([owner[id(e)] for e in batch])[:, None].expand_as(mask)[mask]
        out.append((ids, att, lab, mask, rows, token_strata(mask)))
    return out


def _token_nll(model, ids: torch.Tensor, att: torch.Tensor, lab: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32 NLL of every labelled target (the sweep's ``target_nll``, unreduced)."""
    from mergelaws.evaluate import LOGIT_CHUNK_ROWS, _decoder_and_head

    targets = lab[:, 1:][mask]
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1][mask]
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    h = decoder(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1][mask]
    return torch.cat([torch.nn.functional.cross_entropy(head(h[i:i + LOGIT_CHUNK_ROWS]).float(),
                                                        targets[i:i + LOGIT_CHUNK_ROWS], reduction="none")
                      for i in range(0, h.shape[0], LOGIT_CHUNK_ROWS)])


def losses_at(model, base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]], betas,
              evalsets: dict[str, list[Example]], *, pad_id: int, batch_tokens: int = 8192,
              device: str | torch.device = "cpu") -> np.ndarray:
    """Exact losses (points x domains, in ``evalsets`` order) at theta_0 + sum_i beta_i v_i for each
    beta of ``betas``: token-weighted NLL per target token, every domain's examples in one
    length-bucketed stream (one forward per batch of all domains; sums per domain in float64). The
    model's own weights are restored afterwards."""
    nll, tok = stratified_losses_at(model, base, vectors, betas, evalsets, pad_id=pad_id,
                                    batch_tokens=batch_tokens, device=device)
    n = tok.sum(-1)
    return np.where(n > 0, nll.sum(-1) / np.maximum(n, 1), np.nan)


@torch.no_grad()
def stratified_losses_at(model, base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]], betas,
                         evalsets: dict[str, list[Example]], *, pad_id: int, batch_tokens: int = 8192,
                         device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``losses_at``'s passes, kept by response stratum (``token_strata``): the NLL sums (points x
    domains x strata, float64) and the target counts (domains x strata)."""
    betas = [np.asarray(b, dtype=float) for b in betas]
    D, H = len(evalsets), n_strata(e for ex in evalsets.values() for e in ex)
    out = np.zeros((len(betas), D, H))
    tok = torch.zeros(D * H, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    live = dict(model.named_parameters())
    saved = {n: live[n].detach().clone() for n in base}
    stream = [tuple(t.to(device) for t in b) for b in _stream(evalsets, batch_tokens, pad_id)]
    for ids, att, lab, mask, rows, strata in stream:
        tok.index_add_(0, rows * H + strata, torch.ones(len(rows), dtype=torch.float64, device=device))
    for i, beta in enumerate(betas):
        set_point(live, base, vectors, beta)
        nll = torch.zeros(D * H, dtype=torch.float64, device=device)
        for ids, att, lab, mask, rows, strata in stream:
            nll.index_add_(0, rows * H + strata, _token_nll(model, ids, att, lab, mask).double())
        out[i] = nll.cpu().numpy().reshape(D, H)
    for n, t in saved.items():
        live[n].copy_(t)
    model.train(was_training)
    return out, tok.cpu().numpy().reshape(D, H)


def weight_gram(vectors: list[dict[str, torch.Tensor]], names=None) -> np.ndarray:
    """v_i^T v_j in float64, summed over tensors by ``blocked_dot`` (a float64 copy of every task
    vector at once would be 8 x M bytes a parameter: 9.7 GB for nine 135M experts)."""
    M = len(vectors)
    gram = np.zeros((M, M))
    for n in (names if names is not None else (list(vectors[0]) if M else ())):
        st = stacked(vectors, n)
        if st is not None:
            gram += np.triu(blocked_matmul(st, st))
            continue
        for i in range(M):
            for j in range(i, M):
                gram[i, j] += blocked_dot(vectors[i][n], vectors[j][n])
    return np.triu(gram) + np.triu(gram, 1).T


def _dot_vectors(vectors: list[dict[str, torch.Tensor]], name: str, g: torch.Tensor) -> np.ndarray:
    """(v_i[name]^T g) for every task vector, float64 sums of fp32 blocks; ``g`` dense, or sparse by
    rows (an embedding's: only its rows enter)."""
    st = stacked(vectors, name)
    if g.is_sparse:
        g = g.coalesce()
        rows, vals = g.indices()[0], g.values()
        if st is not None:
            st = st.view(len(vectors), *vectors[0][name].shape)[:, rows]
            return blocked_matmul(st.reshape(len(vectors), -1), vals.reshape(1, -1))[:, 0]
        return np.array([blocked_dot(v[name][rows], vals) for v in vectors])
    if st is not None:
        return blocked_matmul(st, g.view(1, -1))[:, 0]
    return np.array([blocked_dot(v[name], g) for v in vectors])


def gradient_at(model, base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
                evalsets: dict[str, list[Example]], *, pad_id: int, beta0=None, experts: list[str] | None = None,
                point: str = "center", batch_tokens: int = 8192, device: str | torch.device = "cpu",
                part: dict[str, list[Example]] | None = None, backward_dtype: str = "float32",
                deferred: bool = True, split: bool = True) -> Expansion:
    """Loss and a = (g^T v_i) by one backward pass per domain, with G the weight-space Gram
    (v_i^T v_j: H replaced by the identity) -- the cheap surrogate that a calibration rescales.
    ``part``: some of ``evalsets``' examples (by identity), whose loss per domain the same forward
    passes also give (``part_losses``; NaN for a domain with none). ``backward_dtype`` bfloat16: the
    linear layers' backward in bf16 (``bf16_backward``): the losses are the same, a carries bf16 rounding;
    with ``deferred`` their weights' gradients are formed once per domain (``DeferredWeightGrads``), not
    per batch."""
    M = len(vectors)
    beta0 = np.zeros(M) if beta0 is None else np.asarray(beta0, dtype=float)
    t0 = time.time()
    names = list(base)
    # the Gram and, per domain, g^T v_i as float64 sums over tensors, one tensor's stack at a time
    # (a persistent float64 copy of every task vector would be 8 x M bytes a parameter: 9.7 GB for
    # nine experts of a 135M model)
    gram = weight_gram(vectors, names)
    live = dict(model.named_parameters())
    saved = {n: live[n].detach().clone() for n in names}
    set_point(live, base, vectors, beta0)
    was_training = model.training
    model.eval()
    out, fwd, parts, part_strata = {}, 0, {}, {}
    with bf16_backward(model, enabled=backward_dtype == "bfloat16", defer=deferred, split=split) as low:
        for d, examples in evalsets.items():
            nll, n_tok = 0.0, 0
            p_nll, p_tok = (np.zeros(n_strata((part or {}).get(d, []))) for _ in range(2))
            inside = {id(e) for e in (part or {}).get(d, [])}
            model.zero_grad(set_to_none=True)
            for batch in eval_batches(examples, batch_tokens):
                ids, att, lab = (t.to(device) for t in pad_batch(batch, pad_id))
                mask = lab[:, 1:] != IGNORE
                k = int(mask.sum())
                if not k:
                    continue
                tok = _token_nll(model, ids, att, lab, mask)
                s = tok.sum()
                s.backward()
                nll, n_tok, fwd = nll + float(s.detach()), n_tok + k, fwd + ids.numel()
                if inside:
                    row = torch.arange(len(batch), device=mask.device)[:, None].expand_as(mask)[mask]
                    sel = torch.tensor([id(e) in inside for e in batch], device=mask.device)[row]
                    st = token_strata(mask)[sel].cpu()
                    p_nll += torch.bincount(st, tok.detach()[sel].double().cpu(), len(p_nll)).numpy()
                    p_tok += torch.bincount(st, minlength=len(p_tok)).numpy()
            if part is not None:
                parts[d] = float(p_nll.sum() / p_tok.sum()) if p_tok.sum() else float("nan")
                part_strata[d] = (p_nll, p_tok)
            n = max(n_tok, 1)
            a = np.zeros(M)
            grads = [(m, live[m].grad) for m in names if live[m].grad is not None]
            if low.deferred is not None:
                grads += [(m, g) for m, g in low.deferred.take().items() if m in base]
            for m, g in grads:
                if M:
                    a += _dot_vectors(vectors, m, g.detach().cpu())
            a /= n
            out[d] = DomainQuantities(d, n_tok, nll / n if n_tok else float("nan"), a, gram.copy())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, t in saved.items():
            live[n].copy_(t)
    model.train(was_training)
    notes = ["G is the weight-space Gram v_i^T v_j (H = identity)"]
    if low.mods:
        notes.append("the linear layers' backward in bfloat16 (the forward and the losses in fp32)")
    return Expansion(point, list(experts or [f"e{i}" for i in range(M)]), beta0, out, seconds=time.time() - t0,
                     forward_tokens=fwd, notes=notes,
                     part_losses=parts, part_strata=part_strata)


@torch.no_grad()
def finite_difference_logits(model, params: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor],
                             example: Example, *, pad_id: int, eps: float = 1e-3) -> torch.Tensor:
    """(logits(theta + eps v) - logits(theta - eps v)) / (2 eps) at the targets of one example."""
    ids, att, lab = pad_batch([example], pad_id)
    f, _ = target_logits_fn(model, ids, att, lab)
    plus = {n: params[n] + eps * tangent[n] for n in params}
    minus = {n: params[n] - eps * tangent[n] for n in params}
    return (f(plus).double() - f(minus).double()) / (2 * eps)


def jvp_logits(model, params: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor], example: Example, *,
               pad_id: int) -> torch.Tensor:
    """J v at the targets of one example (forward mode)."""
    ids, att, lab = pad_batch([example], pad_id)
    f, _ = target_logits_fn(model, ids, att, lab)
    return jvp(f, (params,), (tangent,))[1].detach()
