"""Vision encoders (towers) of vision-language models: plain modules over pixel tensors,
with no KV cache and no engine state (an image is encoded in one non-causal pass)."""
