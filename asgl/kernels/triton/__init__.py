"""Our own Triton kernels for the GPU fast path; each has a torch reference it is tested
against (tests/test_triton_kernels.py).

- `extend_attention`: new tokens over their cached prefix (read through req_to_token) plus
  themselves, causally; prefill, chunked prefill, prefix hits and mixed batches.
- `decode_attention`: one query token per request over a long KV history, split-KV
  (flash-decoding) in two stages.
- `norm`: RMSNorm fused with the residual add before it.
- `rotary`: rotary embedding applied in place to q and k from a cos/sin cache.
- `activation`: SiLU(gate) * up.
- `fused_moe`: routed experts as grouped GEMMs over expert-sorted rows (sort/align on the
  device, gate-up with the activation fused, down with the routing weights); block sizes
  from `moe_config` (tables in `moe_configs/`); `moe_topk`: the router's top-k in one launch.

The modules import triton at import time; import them only where triton exists (CUDA
machines, or the CPU with `TRITON_INTERPRET=1` for tests).
"""
