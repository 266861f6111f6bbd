"""Tiny Hugging Face MoE models built from configs (no hub): Mixtral, Qwen3-MoE and DeepSeek-V3,
the three block families trilemma_moe.integrations.hf converts. Weights are drawn from a seed and
distinct per expert, as trained experts are."""
import torch

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
VOCAB, HIDDEN, FFN, EXPERTS, TOP_K = 96, 32, 48, 8, 2


def tiny_config(family: str, layers: int = 2, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=TOP_K, tie_word_embeddings=False)
    if family == "mixtral":
        from transformers import MixtralConfig
        cfg = MixtralConfig(**common, intermediate_size=FFN, num_local_experts=EXPERTS)
    elif family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        cfg = Qwen3MoeConfig(**common, intermediate_size=2 * FFN, moe_intermediate_size=FFN, num_experts=EXPERTS,
                             norm_topk_prob=True, head_dim=8)
    elif family == "deepseek_v3":
        from transformers import DeepseekV3Config
        common["num_key_value_heads"] = 4   # multi-head latent attention: one KV head per query head
        cfg = DeepseekV3Config(**common, intermediate_size=2 * FFN, moe_intermediate_size=FFN, n_routed_experts=EXPERTS,
                               n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0,
                               routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                               qk_nope_head_dim=8, v_head_dim=8, rope_interleave=False)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, layers: int = 2, dtype=torch.float32, experts="eager", **overrides):
    """A causal LM of ``family`` whose every parameter is drawn afresh from ``seed`` (std 0.08;
    the routers' rows at 0.3 so routing is decisive, as in a trained model). ``experts``: transformers'
    experts implementation; "eager" is its per-expert loop, a plain reference in any dtype."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, **overrides), experts_implementation=experts)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                continue
            std = 0.3 if name.endswith("gate.weight") else 0.08
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.to(dtype)


def moe_blocks(model):
    """The sparse MoE blocks (before conversion) in module order."""
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")
            and hasattr(m.experts, "gate_up_proj")]
