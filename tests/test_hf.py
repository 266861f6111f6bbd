"""Hugging Face MoE models converted to our layer (trilemma_moe/integrations/hf.py), one process:
the converted experts against the original block's for the same routing, the router mapping on
its own, the grouping of trained-like experts, Hugging Face's output contract, saving and loading,
and the refusals. Training under DeepSpeed with several ranks: tests/test_hf_deepspeed.py."""
import copy

import pytest
import torch

from hf_models import EXPERTS, FAMILIES, FFN, HIDDEN, TOP_K, moe_blocks, tiny_model

transformers = pytest.importorskip("transformers")

from trilemma_moe.integrations.hf import (ClusteredMoEBlock, attach_optimizer, convert_moe_blocks,  # noqa: E402
                                          load_converted, moe_aux_loss)

FULL_RANK = min(HIDDEN, FFN)


def converted_blocks(model):
    return [m for m in model.modules() if isinstance(m, ClusteredMoEBlock)]


def _pairs(family, rank=FULL_RANK, seed=0, **knobs):
    """(original blocks, converted blocks, converted model) of one tiny model in float64."""
    model = tiny_model(family, seed=seed, dtype=torch.float64)
    original = [copy.deepcopy(b) for b in moe_blocks(model)]
    reports = convert_moe_blocks(model, rank=rank, **knobs)
    return original, converted_blocks(model), model, reports


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_conversion_computes_the_original_experts_for_the_same_routing(family):
    """At full rank the decomposition is lossless: for the routing our layer chooses, the converted
    block's output equals the original block's experts (called through the block's own experts
    module, with our expert ids and combine weights), plus DeepSeek's shared experts and its
    routed scaling."""
    original, converted, model, reports = _pairs(family, seed=1)
    assert all(r["relative_error"] < 1e-12 for r in reports), reports
    model.eval()
    torch.manual_seed(5)
    for old, new in zip(original, converted):
        x = torch.randn(37, HIDDEN, dtype=torch.float64)
        layer = new.moe.moe
        with torch.no_grad():
            routing = layer.route(x)
            ids = layer.expert_of_slot[routing.slot_idx].reshape(len(x), -1)
            weights = routing.weights.reshape(len(x), -1)
            expected = old.experts(x, ids, weights)
            if family == "deepseek_v3":
                expected = old.gate.routed_scaling_factor * expected + old.shared_experts(x)
            got = new(x.unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_rows_seed_the_expert_vectors_and_group_prototypes(family):
    """v_i is the block's router row of the expert in slot i; u_g the mean of its members' rows;
    the router logits Hugging Face records are log(p_g p_i) in expert order, computed here by
    hand from the block's router weight and the grouping (float64)."""
    original, converted, model, _ = _pairs(family, rank=8, seed=2)
    torch.manual_seed(6)
    for old, new in zip(original, converted):
        layer = new.moe.moe
        rows = old.gate.weight.detach()
        slots = layer.expert_of_slot
        G, K = layer.num_groups, layer.experts_per_group
        torch.testing.assert_close(layer.router.expert_vec.detach(), rows[slots], rtol=0, atol=0)
        torch.testing.assert_close(layer.router.group_proto.detach(), rows[slots].view(G, K, -1).mean(1))
        group = layer.group_assignment()
        assert sorted(torch.bincount(group, minlength=G).tolist()) == [K] * G
        x = torch.randn(23, HIDDEN, dtype=torch.float64)
        logits = x @ rows.t()                                   # [T, E], expert order
        group_logits = torch.stack([logits[:, group == g].mean(1) for g in range(G)], 1)
        p_group = torch.softmax(group_logits, 1)[:, group]
        p_inside = torch.empty_like(logits)
        for g in range(G):
            p_inside[:, group == g] = torch.softmax(logits[:, group == g], 1)
        with torch.no_grad():
            torch.testing.assert_close(new.router_logits(x), torch.log(p_group * p_inside), rtol=1e-10, atol=1e-10)


def test_the_grouping_finds_experts_that_were_trained_alike():
    """Experts made as noisy copies of 4 families (weights and router rows), in a scrambled order:
    the converted layer puts each family in one group."""
    model = tiny_model("mixtral", seed=3, layers=1)
    block = moe_blocks(model)[0]
    gen = torch.Generator().manual_seed(11)
    family = torch.randperm(EXPERTS, generator=gen) % 4
    with torch.no_grad():
        for p in (block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight):
            centres = torch.randn((4, *p.shape[1:]), generator=gen) * p.std()
            p.copy_(centres[family] + 0.2 * p.std() * torch.randn(p.shape, generator=gen))
    convert_moe_blocks(model, num_groups=4)
    group = converted_blocks(model)[0].moe.moe.group_assignment()
    for f in range(4):
        assert len(set(group[family == f].tolist())) == 1, (family, group)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_hugging_face_output_contract(family):
    """Training forward: outputs.loss = the model's own loss (cross-entropy, plus its router aux
    loss on the recorded logits when output_router_logits) + our layers' balance and z losses;
    one router-logits tensor [tokens, E] per block; gradients reach both router stages."""
    model = tiny_model(family, seed=4)
    convert_moe_blocks(model, rank=8)
    model.train()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    ours = moe_aux_loss(model)
    assert ours is not None and float(ours.detach()) > 0
    torch.testing.assert_close(out.loss, ce + model.config.router_aux_loss_coef * out.aux_loss + ours)
    assert len(out.router_logits) == 2 and all(t.shape == (22, EXPERTS) for t in out.router_logits)
    out.loss.backward()
    layer = converted_blocks(model)[0].moe.moe
    assert layer.router.group_proto.grad.abs().sum() > 0 and layer.router.expert_vec.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        plain = model(ids, labels=ids)
    assert abs(float(plain.loss) - float(ce)) < 1e-5   # evaluation: the model's loss alone


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_after_training_restores_the_same_model(tmp_path, family):
    """save_pretrained (safetensors) and load_converted give back the trained model: its outputs bit
    for bit, slot tables and step counters (Mixtral's legacy key renaming on save included)."""
    model = tiny_model(family, seed=5, tie_word_embeddings=family == "mixtral")
    model.tie_weights()
    convert_moe_blocks(model, rank=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    attach_optimizer(model, opt)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step(), opt.zero_grad()
    model.save_pretrained(str(tmp_path))
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    model_class = type(model) if family == "qwen3_moe" else None   # a concrete class, or AutoModelForCausalLM
    again = load_converted(str(tmp_path), model_class)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    for a, b in zip(converted_blocks(model), converted_blocks(again)):
        assert torch.equal(a.moe.moe.expert_of_slot, b.moe.moe.expert_of_slot)
        assert a.moe.moe.step == b.moe.moe.step == 3 and b.moe.moe.clustered


def test_load_refuses_a_model_that_was_not_converted(tmp_path):
    tiny_model("mixtral").config.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no 'trilemma_moe' entry"):
        load_converted(str(tmp_path))


def test_refusals_name_the_feature():
    model = tiny_model("deepseek_v3")
    with torch.no_grad():
        moe_blocks(model)[1].gate.e_score_correction_bias[3] = 0.1
    with pytest.raises(ValueError, match="e_score_correction_bias is non-zero"):
        convert_moe_blocks(model)
    with pytest.raises(ValueError, match="router_jitter_noise"):
        convert_moe_blocks(tiny_model("mixtral", router_jitter_noise=0.1))
    with pytest.raises(ValueError, match="hidden_act='tanh'"):
        convert_moe_blocks(tiny_model("mixtral", hidden_act="tanh"))
    converted = tiny_model("mixtral")
    convert_moe_blocks(converted)
    with pytest.raises(ValueError, match="no sparse MoE block"):
        convert_moe_blocks(converted)
    from transformers import LlamaConfig, LlamaForCausalLM
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        convert_moe_blocks(dense)


def test_default_structure_and_compression():
    """E=8, top-2: G=2 groups of 4 (K = 2k), rank min(d, d_ff) / 4 = 8 (16 from d, d_ff >= 64 on):
    fewer expert parameters, a lossy but faithful decomposition."""
    model = tiny_model("mixtral")
    reports = convert_moe_blocks(model)
    layer = converted_blocks(model)[0].moe.moe
    assert (layer.num_groups, layer.config.rank, layer.config.top_k) == (2, 8, TOP_K)
    assert all(0 < r["relative_error"] < 1 and r["expert_parameters_after"] < r["expert_parameters_before"]
               for r in reports), reports


def test_initialize_refuses_a_config_that_does_not_ask_or_also_enables_autoep():
    from trilemma_moe.integrations.hf import initialize
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="\"convert_hf_moe\": true"):
        initialize(model, {"train_micro_batch_size_per_gpu": 1, "trilemma_moe": {"rank": 4}})
    both = {"train_micro_batch_size_per_gpu": 1, "trilemma_moe": {"convert_hf_moe": True},
            "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": "mixtral"}}
    with pytest.raises(ValueError, match="both replace the same MoE blocks"):
        initialize(model, both)
    assert moe_blocks(model), "a refused initialize converted nothing"


def test_the_transformers_internals_we_lean_on_are_there():
    """docs/guides/huggingface.md ("transformers internals we lean on") names these; a transformers that
    changes one fails here, naming it, rather than deep inside a conversion or a Trainer run."""
    import inspect

    from transformers import PreTrainedModel, Trainer
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds3
    from transformers.models.mixtral import modeling_mixtral as mixtral
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3
    for model_class, router in ((mixtral.MixtralPreTrainedModel, mixtral.MixtralTopKRouter),
                                (qwen3.Qwen3MoePreTrainedModel, qwen3.Qwen3MoeTopKRouter),
                                (ds3.DeepseekV3PreTrainedModel, ds3.DeepseekV3TopkRouter)):
        recorder = model_class._can_record_outputs["router_logits"]
        assert recorder.target_class is router and recorder.index == 0, (model_class, recorder)
    assert "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters
    assert callable(Trainer.get_optimizer_cls_and_kwargs) and callable(Trainer.create_optimizer)
    assert "trainer.create_optimizer()" in inspect.getsource(hf_deepspeed.deepspeed_optim_sched)


def test_a_config_keeps_the_converters_defaults_for_the_fields_it_leaves_alone():
    """A TrilemmaMoEConfig that sets alpha only: G, r and the router temperature as without it."""
    from trilemma_moe import TrilemmaMoEConfig
    model = tiny_model("mixtral")
    convert_moe_blocks(model, TrilemmaMoEConfig(alpha=0.5))
    cfg = converted_blocks(model)[0].moe.moe.config
    assert (cfg.alpha, cfg.num_groups, cfg.rank, cfg.router_temperature_end) == (0.5, 2, 8, 1.0)


def test_the_models_own_weight_initialisation_leaves_a_converted_model_working():
    """transformers re-initialises router modules by class (_init_weights); the converted block's
    logits stand-in takes it and the model still computes."""
    model = tiny_model("deepseek_v3")
    convert_moe_blocks(model)
    model.init_weights()
    ids = torch.randint(0, 96, (1, 7))
    assert torch.isfinite(model(ids).logits).all()
