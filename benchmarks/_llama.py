"""Random Llama-shaped float32 state dicts for the merge benchmarks (bench_merge, bench_mergekit)."""

from __future__ import annotations


def llama_state(hidden: int, intermediate: int, vocab: int, layers: int, *, seed: int = 0,
                lm_head: bool = False) -> dict:
    """N(0, 0.02^2) weights and unit norms; drawn in a fixed order from one seeded generator
    (embedding, final norm, lm_head if asked, then each layer), so a seed gives the same tensors."""
    import torch

    h, inter = hidden, intermediate
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g) * 0.02,
          "model.norm.weight": torch.ones(h)}
    if lm_head:
        sd["lm_head.weight"] = torch.randn(vocab, h, generator=g) * 0.02
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = torch.randn(h, h, generator=g) * 0.02
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, h, generator=g) * 0.02
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, h, generator=g) * 0.02
        sd[p + "mlp.down_proj.weight"] = torch.randn(h, inter, generator=g) * 0.02
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return sd
