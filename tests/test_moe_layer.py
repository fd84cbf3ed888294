"""The MoE layer (asgl/layers/moe) on the CPU: routers against transformers' own router
modules (DeepSeek V2 / V3, Mixtral, Qwen2-MoE), `FusedMoE` against transformers'
Mixtral experts on the same weights, and its sharding: tensor-parallel ranks (intermediate
split) and expert-parallel ranks (experts split) whose partial outputs add up to the
unsharded layer, loaded from per-expert and from stacked tensors.
"""

from __future__ import annotations

import types

import pytest
import torch
import transformers

from asgl.layers.moe import FusedMoE, MoEGate, RouterConfig, map_expert_weight, select_experts
from asgl.layers.moe import fused_moe as fused_moe_mod
from helpers import rel_err

T, H, E = 37, 32, 16


def _same_choice(ids, weights, ref_ids, ref_weights):
    """Same experts with the same weights per token, in any order."""
    order, ref_order = ids.long().sort(-1), ref_ids.long().sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices),
                               ref_weights.float().gather(1, ref_order.indices))


def _deepseek_config(cls_name: str, **kw):
    base = dict(hidden_size=H, n_routed_experts=E, num_experts_per_tok=4, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, vocab_size=32, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=64, moe_intermediate_size=16)
    return getattr(transformers, cls_name)(**{**base, **kw})


def test_router_matches_deepseek_v3():
    """sigmoid scores, correction bias for the choice only, groups scored by their top 2,
    renormalized, scaled."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    hf = DeepseekV3TopkRouter(_deepseek_config("DeepseekV3Config", norm_topk_prob=True))
    torch.manual_seed(0)
    with torch.no_grad():
        hf.weight.normal_()
        hf.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(T, H)
    _, ref_w, ref_ids = hf(x)
    router = RouterConfig(top_k=4, scoring="sigmoid", renormalize=True, num_expert_group=4,
                          topk_group=2, group_score="top2_sum", routed_scaling_factor=2.5,
                          use_correction_bias=True)
    gate = MoEGate(H, E, float32=True, correction_bias=True)
    gate.weight.data.copy_(hf.weight)
    gate.e_score_correction_bias.data.copy_(hf.e_score_correction_bias)
    w, ids = select_experts(gate(x), router, gate.e_score_correction_bias)
    _same_choice(ids, w, ref_ids, ref_w)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_router_matches_deepseek_v2(method):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    config = _deepseek_config("DeepseekV2Config", topk_method=method, n_routed_experts=E)
    config.num_experts = E
    hf = DeepseekV2TopkRouter(config)
    torch.manual_seed(1)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(T, H)
    _, ref_w, ref_ids = hf(x)
    groups = dict(num_expert_group=4, topk_group=2) if method != "greedy" else {}
    router = RouterConfig(top_k=4, renormalize=False, routed_scaling_factor=2.5, **groups)
    w, ids = select_experts(torch.nn.functional.linear(x, hf.weight), router)
    _same_choice(ids, w, ref_ids, ref_w)


@pytest.mark.parametrize("cls_path,renorm", [
    ("mixtral.modeling_mixtral.MixtralTopKRouter", True),
    ("qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", False),
    ("qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", True)])
def test_router_matches_softmax_routers(cls_path, renorm):
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(__import__(f"transformers.models.{module}", fromlist=[name]), name)
    config = types.SimpleNamespace(num_experts_per_tok=3, num_local_experts=E, num_experts=E,
                                   hidden_size=H, norm_topk_prob=renorm)
    hf = cls(config)
    torch.manual_seed(2)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(T, H)
    logits, ref_w, ref_ids = hf(x)
    w, ids = select_experts(logits, RouterConfig(top_k=3, renormalize=renorm))
    _same_choice(ids, w, ref_ids, ref_w)


def test_router_p_norm():
    """DBRX's moe_normalize_expert_weights: the chosen weights divided by their p-norm."""
    logits = torch.randn(T, E)
    w, ids = select_experts(logits, RouterConfig(top_k=4, norm_p=2.0))
    top = torch.topk(logits.softmax(-1), 4)
    _same_choice(ids, w, top.indices, top.values / top.values.norm(dim=-1, keepdim=True))


def test_router_rejects_bad_configs():
    with pytest.raises(ValueError, match="scoring"):
        RouterConfig(top_k=2, scoring="relu")
    with pytest.raises(ValueError, match="both"):
        RouterConfig(top_k=2, num_expert_group=4)
    with pytest.raises(ValueError, match="exceeds"):
        select_experts(torch.randn(3, 4), RouterConfig(top_k=5))
    with pytest.raises(ValueError, match="correction bias"):
        select_experts(torch.randn(3, 4), RouterConfig(top_k=2, use_correction_bias=True))


# ------------------------------------------------------------------------- the experts
I = 24


def _hf_mixtral_block():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I,
                                        num_local_experts=E, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.eval()


def _per_expert_tensors(block) -> dict[str, torch.Tensor]:
    """The block's weights in Mixtral's published per-expert layout."""
    out = {"gate.weight": block.gate.weight.detach()}
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    for e in range(E):
        out[f"experts.{e}.w1.weight"] = gate_up[e, :I]
        out[f"experts.{e}.w3.weight"] = gate_up[e, I:]
        out[f"experts.{e}.w2.weight"] = down[e]
    return out


def _load(layer: FusedMoE, tensors: dict[str, torch.Tensor], names=("w1", "w3", "w2")) -> None:
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        mapped = map_expert_weight(f"mlp.{name}", *names)
        if mapped is None:
            continue
        param = params[mapped[0].removeprefix("mlp.experts.")]
        param.weight_loader(param, t, mapped[1])
    layer.check_loaded()


def test_fused_moe_matches_hf_mixtral_block():
    block = _hf_mixtral_block()
    layer = FusedMoE(E, H, I, RouterConfig(top_k=2), prefix="mlp.experts")
    _load(layer, _per_expert_tensors(block))
    x = torch.randn(T, H)
    with torch.no_grad():
        ref = block(x[None])[0] if isinstance(block(x[None]), tuple) else block(x[None])
        out = layer(x, torch.nn.functional.linear(x, block.gate.weight))
    assert rel_err(out, ref.reshape(T, H)) < 1e-5


def _sharded(monkeypatch, tp: int, ep: int, tensors, stacked: bool) -> torch.Tensor:
    """Sum of every rank's partial output of a FusedMoE built as rank r of tp."""
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5))
    total = torch.zeros(T, H)
    for rank in range(tp):
        monkeypatch.setattr(fused_moe_mod, "get_tp_size", lambda: tp)
        monkeypatch.setattr(fused_moe_mod, "get_tp_rank", lambda r=rank: r)
        layer = FusedMoE(E, H, I, RouterConfig(top_k=3), ep_size=ep, reduce_results=False)
        if stacked:  # transformers 5's stacked tensors, through shard id None
            layer.weight_loader(layer.w13_weight, tensors["gate_up"])
            layer.weight_loader(layer.w2_weight, tensors["down"])
        else:
            _load(layer, tensors)
        assert layer.w13_weight.shape == (E // ep, 2 * I * ep // tp, H)
        total += layer(x, logits)
    return total


@pytest.mark.parametrize("tp,ep", [(2, 1), (4, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
def test_sharded_ranks_add_up_to_the_whole_layer(monkeypatch, tp, ep, stacked):
    block = _hf_mixtral_block()
    tensors = _per_expert_tensors(block)
    if stacked:
        tensors = {"gate_up": block.experts.gate_up_proj.detach(),
                   "down": block.experts.down_proj.detach()}
    whole = _sharded(monkeypatch, 1, 1, tensors, stacked)
    parts = _sharded(monkeypatch, tp, ep, tensors, stacked)
    assert rel_err(parts, whole) < 1e-5


def test_half_loaded_experts_are_refused():
    layer = FusedMoE(E, H, I, RouterConfig(top_k=2), prefix="model.layers.0.mlp.experts")
    tensors = _per_expert_tensors(_hf_mixtral_block())
    del tensors["experts.5.w3.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 expert tensors.*\(5, 'up'\)"):
        _load(layer, tensors)


def test_bad_shapes_and_names_are_refused():
    layer = FusedMoE(E, H, I, RouterConfig(top_k=2))
    with pytest.raises(ValueError, match="does not fit"):
        layer.weight_loader(layer.w13_weight, torch.zeros(I + 1, H), (0, "gate"))
    with pytest.raises(ValueError, match="out of range"):
        layer.weight_loader(layer.w13_weight, torch.zeros(I, H), (E, "gate"))
    with pytest.raises(ValueError, match="does not belong"):
        layer.weight_loader(layer.w13_weight, torch.zeros(H, I), (0, "down"))
    with pytest.raises(ValueError, match="ep-size 3"):
        FusedMoE(E, H, I, RouterConfig(top_k=2), ep_size=3)
    assert map_expert_weight("model.layers.1.mlp.experts.12.up_proj.weight") == (
        "model.layers.1.mlp.experts.w13_weight", (12, "up"))
    assert map_expert_weight("model.layers.1.mlp.experts.down_proj") == (
        "model.layers.1.mlp.experts.w2_weight", None)
    assert map_expert_weight("model.layers.1.mlp.shared_expert.up_proj.weight") is None


def test_dense_reference_equals_sparse_reference(monkeypatch):
    """The capture-safe form of the torch experts (every expert on every token, zero
    weights where unchosen) gives the sparse reference's result, EP map included."""
    from asgl.kernels import moe_torch

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(T, H, generator=gen)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    weights, ids = select_experts(torch.randn(T, E, generator=gen), RouterConfig(top_k=3))
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[4:12] = torch.arange(8, dtype=torch.int32)
    for kw, (a, b) in [({}, (w13, w2)), ({"expert_map": emap}, (w13[4:12], w2[4:12]))]:
        sparse = moe_torch.fused_experts_ref(x, a, b, weights, ids, **kw)
        mapped = ids.long() if not kw else emap.long()[ids.long()]
        dense = moe_torch._dense_experts(x, a, b, weights, mapped, "silu")
        assert rel_err(dense, sparse) < 1e-5
