"""Llama-family models against HF transformers on tiny random checkpoints, in float32:
a ragged prefill batch, and chunked prefill + decode through the KV pool."""

from types import SimpleNamespace

import pytest
import torch
import transformers

from asgl.models.registry import get_model_class
from helpers import Pools, rel_err, run_steps, tp_worker

TINY = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, initializer_range=0.1)
CASES = {
    "llama_gqa": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", dict(head_dim=32, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "yarn_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                        original_max_position_embeddings=32))),
    "tied_mqa": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen2_bias": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "mistral_window": ("MistralConfig", dict(sliding_window=5)),
}


def make_pair(name):
    """(HF model, our model) with the same random weights."""
    config_cls, extra = CASES[name]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them count
        for pname, p in hf.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.3)
    ours = get_model_class(config.architectures or [hf.__class__.__name__])(config).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_batch_matches_hf(name):
    hf, ours = make_pair(name)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (13, 5, 21)]
    pools = Pools(ours.num_layers, ours.num_kv_heads, ours.head_dim,
                  shuffle=torch.Generator().manual_seed(2))
    batch = pools.build([pools.new_seq() for _ in prompts], prompts)
    with torch.no_grad():
        hidden = ours(batch.input_ids, batch.positions, batch)
        logits = ours.compute_logits(hidden[batch.logits_indices])
    assert logits.dtype == torch.float32 and logits.shape == (batch.num_tokens, 200)
    for prompt, got in zip(prompts, logits.split([len(p) for p in prompts])):
        assert rel_err(got, hf_logits(hf, prompt)) < 1e-4


# Tokens each request brings per step (0: absent): A prefills in two chunks, C arrives a
# step late, the last steps are pure decode.
PLANS = [[10, 7, 1, 1, 1, 1], [6, 1, 1, 1, 1, 1], [0, 9, 1, 1, 1, 1]]


def random_seqs(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (sum(p),), generator=gen).tolist() for p in PLANS]


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_prefill_and_decode_match_hf(name):
    hf, ours = make_pair(name)
    seqs_ids = random_seqs(3)
    for ids, got in zip(seqs_ids, run_steps(ours, PLANS, seqs_ids)):
        assert rel_err(got, hf_logits(hf, ids)) < 1e-4


def test_tensor_parallel_2_ranks_match_hf(tmp_path):
    """Two gloo ranks: split KV heads (gqa), replicated KV head (mqa), q/k/v bias, padded
    vocabulary split unevenly over the ranks."""
    names = ["llama_gqa", "tied_mqa", "qwen2_bias"]
    seqs_ids = random_seqs(5)
    jobs, refs = [], []
    for name in names:
        hf, ours = make_pair(name)
        # A plain namespace, so the ranks need not import transformers (slow to start).
        config = SimpleNamespace(**hf.config.to_dict())
        jobs.append((type(ours), config, dict(hf.state_dict()), PLANS, seqs_ids))
        refs.append([hf_logits(hf, ids) for ids in seqs_ids])
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(tp_worker, args=(2, str(tmp_path / "init"), jobs, str(out)),
                                nprocs=2, join=True)
    for name, got, ref in zip(names, torch.load(out), refs):
        for g, r in zip(got, ref):
            assert rel_err(g, r) < 1e-4, name


def test_registry_names_unsupported_architecture():
    with pytest.raises(ValueError, match="FooForCausalLM.*LlamaForCausalLM"):
        get_model_class(["FooForCausalLM"])


def test_load_weights_rejects_unknown_and_missing():
    hf, ours = make_pair("llama_gqa")
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match="no parameter"):
        ours.load_weights([*state.items(), ("model.extra.weight", torch.zeros(1))])
    state.pop("model.norm.weight")
    with pytest.raises(ValueError, match="model.norm.weight"):
        ours.load_weights(state.items())
