"""Llama-layout families published with their own modelling code: XVERSE
(`XverseForCausalLM`: Llama's names and blocks, multi-head attention) and the first Yi
checkpoints (`YiForCausalLM`: `ln1` / `ln2` for the two norms; later Yi releases are
`LlamaForCausalLM` outright), as vLLM aliases them."""

from __future__ import annotations

from asgl.models.remote_layout import RemoteLayoutLM


class XverseForCausalLM(RemoteLayoutLM):
    pass


class YiForCausalLM(RemoteLayoutLM):
    renames = [(r"\.ln1\.", ".input_layernorm."), (r"\.ln2\.", ".post_attention_layernorm.")]
