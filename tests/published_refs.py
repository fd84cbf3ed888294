"""Float32 torch transcriptions of published modelling files, over checkpoints in their
published layouts (tensor names, packed tensors) and their config.json fields, for the
families transformers does not implement. Each forward follows its file's own code path
(no KV cache, one sequence, causal), so a checkpoint writer and asgl's loader cannot share
a misreading of a packed layout unnoticed.

- InternLM 2: internlm/internlm2-7b modeling_internlm2.py, as mirrored at
  github.com/NanSang2000/S1mpleAgent@03da3f20510ae96533ca4c3eb0bbb258753ffed5
  (InternLM2Attention.forward: `rearrange(qkv, "b q (h gs d) -> b q h gs d")`).
- Qwen (1): Qwen/Qwen-7B modeling_qwen.py, as mirrored at
  github.com/undefdev/Qwen-7B-Chat@405556da0316d12d3f22161851de0fa05553aae9
  (QWenAttention: `c_attn(x).split(split_size)`; QWenMLP: `c_proj(w1(x) * silu(w2(x)))`;
  `_rotate_half` over `rotary_pct` of each head).
- BaiChuan 2: baichuan-inc/Baichuan2-13B-Chat modeling_baichuan.py, as mirrored at
  github.com/jrd77/Baichuan2-13B-Chat@35e3d5af948ecfe718bbb31633f053ae2a063725
  (`W_pack(x).unflatten(-1, (3, hidden))`, `_gen_alibi_mask`, `_get_interleave`; NormHead:
  `F.normalize(weight)`); the 7B file is the same with rotary instead of ALiBi.
- MiniCPM: openbmb/MiniCPM-2B-sft-bf16 modeling_minicpm.py (embeddings * scale_emb; each
  block's output * scale_depth / sqrt(num_hidden_layers); `lm_head(h / (hidden_size /
  dim_model_base))`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BAICHUAN2_VOCAB = 125696


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _rope(x: torch.Tensor, base: float, rot: int) -> torch.Tensor:
    """x [T, H, D]: rotate_half over the first `rot` dims at positions 0..T-1."""
    T = x.shape[0]
    inv = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    r, rest = x[..., :rot], x[..., rot:]
    r1, r2 = r.chunk(2, -1)
    return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, rest], -1)


def _attend(q, k, v, bias=None) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]; causal softmax(q k / sqrt(D) + bias)."""
    T, H, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], 1)
    v = v.repeat_interleave(H // v.shape[1], 1)
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, H * D)


def internlm2(sd: dict, c: dict, ids: list[int]) -> torch.Tensor:
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    D, g, eps = c["hidden_size"] // H, H // Hkv, c["rms_norm_eps"]
    x = sd["model.tok_embeddings.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, sd[f"{p}.attention_norm.weight"], eps)
        qkv = _linear(sd, f"{p}.attention.wqkv", h).view(len(ids), Hkv, 2 + g, D)
        q = qkv[:, :, :g].reshape(len(ids), H, D)
        k, v = qkv[:, :, -2], qkv[:, :, -1]
        q, k = _rope(q, c["rope_theta"], D), _rope(k, c["rope_theta"], D)
        x = x + _linear(sd, f"{p}.attention.wo", _attend(q, k, v))
        h = _rms(x, sd[f"{p}.ffn_norm.weight"], eps)
        x = x + _linear(sd, f"{p}.feed_forward.w2", F.silu(_linear(
            sd, f"{p}.feed_forward.w1", h)) * _linear(sd, f"{p}.feed_forward.w3", h))
    return _linear(sd, "output", _rms(x, sd["model.norm.weight"], eps))


def qwen(sd: dict, c: dict, ids: list[int]) -> torch.Tensor:
    H, hidden, eps = c["num_attention_heads"], c["hidden_size"], c["layer_norm_epsilon"]
    D = c["kv_channels"]
    rot = int(D * c["rotary_pct"])
    x = sd["transformer.wte.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}"
        h = _rms(x, sd[f"{p}.ln_1.weight"], eps)
        q, k, v = (t.view(len(ids), H, D)
                   for t in _linear(sd, f"{p}.attn.c_attn", h).split(hidden, -1))
        q, k = _rope(q, c["rotary_emb_base"], rot), _rope(k, c["rotary_emb_base"], rot)
        x = x + _linear(sd, f"{p}.attn.c_proj", _attend(q, k, v))
        h = _rms(x, sd[f"{p}.ln_2.weight"], eps)
        x = x + _linear(sd, f"{p}.mlp.c_proj", _linear(sd, f"{p}.mlp.w1", h)
                        * F.silu(_linear(sd, f"{p}.mlp.w2", h)))
    return _linear(sd, "lm_head", _rms(x, sd["transformer.ln_f.weight"], eps))


def _baichuan_slopes(n: int) -> list[float]:
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _baichuan_slopes(2 * closest)[0::2][: n - closest]


def baichuan(sd: dict, c: dict, ids: list[int], alibi: bool) -> torch.Tensor:
    H, hidden, eps = c["num_attention_heads"], c["hidden_size"], c["rms_norm_eps"]
    D, T = hidden // H, len(ids)
    bias = None
    if alibi:  # _gen_alibi_mask: slope * key position (the causal part is in _attend)
        bias = torch.tensor(_baichuan_slopes(H))[:, None, None] * torch.arange(T)[None, None]
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, sd[f"{p}.input_layernorm.weight"], eps)
        proj = _linear(sd, f"{p}.self_attn.W_pack", h).unflatten(-1, (3, hidden))
        q, k, v = (proj[:, j].view(T, H, D) for j in range(3))
        if not alibi:
            base = c.get("rope_theta", 10000.0)
            q, k = _rope(q, base, D), _rope(k, base, D)
        x = x + _linear(sd, f"{p}.self_attn.o_proj", _attend(q, k, v, bias))
        h = _rms(x, sd[f"{p}.post_attention_layernorm.weight"], eps)
        x = x + _linear(sd, f"{p}.mlp.down_proj", F.silu(_linear(
            sd, f"{p}.mlp.gate_proj", h)) * _linear(sd, f"{p}.mlp.up_proj", h))
    head = sd["lm_head.weight"]
    if c["vocab_size"] == BAICHUAN2_VOCAB:  # NormHead
        head = F.normalize(head)
    return F.linear(_rms(x, sd["model.norm.weight"], eps), head)


def minicpm(sd: dict, c: dict, ids: list[int]) -> torch.Tensor:
    H, Hkv, hidden = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    D, eps, L, T = hidden // H, c["rms_norm_eps"], c["num_hidden_layers"], len(ids)
    depth = c["scale_depth"] / math.sqrt(L)
    x = sd["model.embed_tokens.weight"][ids] * c["scale_emb"]
    for i in range(L):
        p = f"model.layers.{i}.self_attn"
        h = _rms(x, sd[f"model.layers.{i}.input_layernorm.weight"], eps)
        q = _linear(sd, f"{p}.q_proj", h).view(T, H, D)
        k = _linear(sd, f"{p}.k_proj", h).view(T, Hkv, D)
        v = _linear(sd, f"{p}.v_proj", h).view(T, Hkv, D)
        q, k = _rope(q, c["rope_theta"], D), _rope(k, c["rope_theta"], D)
        x = x + _linear(sd, f"{p}.o_proj", _attend(q, k, v)) * depth
        m = f"model.layers.{i}.mlp"
        h = _rms(x, sd[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
        x = x + _linear(sd, f"{m}.down_proj", F.silu(_linear(sd, f"{m}.gate_proj", h))
                        * _linear(sd, f"{m}.up_proj", h)) * depth
    h = _rms(x, sd["model.norm.weight"], eps) / (hidden / c["dim_model_base"])
    return F.linear(h, sd.get("lm_head.weight", sd["model.embed_tokens.weight"]))
