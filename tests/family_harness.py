"""The model-family tests' shared harness (test_model_families, test_moe_families,
test_moe_families_more, test_mla_families, test_remote_families).

A tiny random checkpoint of a family is served through the whole engine (`asgl.LLM`, float32
on the CPU, 8-token prefill chunks) and compared with a reference: any `ids -> logits [T, V]`
callable (an HF transformers model through `hf_logits`, or a transcription of the published
forward pass). The checks (`check_through_engine`):

- every logits row the engine computes for a cold prompt (all prompt rows, asked for through
  prompt logprobs, then each decode step) is within 1e-4 relative of the reference's;
- the greedy tokens equal the reference's (past a near-tie, top-2 gap < TIE_GAP, the
  comparison stops: batched and unbatched fp32 matmuls differ in the last bits);
- a second prompt sharing 16 tokens hits the radix cache and matches the same way.

Plus the pieces the files' other tests share: every checkpoint tensor consumed by the
loader, dummy presets' parameter counts, two tensor-parallel gloo ranks, GGUF writing.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
import transformers
from safetensors import safe_open

from helpers import rel_err
from tests.conftest import make_llm, reference_threads

VOCAB = 160
EOS = VOCAB - 1
CHUNK = 8
MAX_NEW = 6
TIE_GAP = 1e-3
GREEDY = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}

RefLogits = Callable[[list[int]], torch.Tensor]


# ---------------------------------------------------------------------------- references
def random_hf_model(config) -> transformers.PreTrainedModel:
    """The HF model of `config` with seeded random weights, in float32, eager attention."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # HF zero-inits biases and norm offsets: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.float().eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """A reference model's logits [T, V] for one sequence (any model returning `.logits`)."""
    with torch.no_grad(), reference_threads():
        return model(torch.tensor([ids])).logits[0].float()


def reference_greedy(ref_logits: RefLogits, prompt: list[int],
                     n: int = MAX_NEW) -> tuple[list[int], list[float]]:
    """The reference's greedy continuation (full forward per step, no EOS) and each step's
    top-2 gap."""
    ids, gaps = list(prompt), []
    for _ in range(n):
        last = ref_logits(ids)[-1]
        top2 = torch.topk(last, 2).values
        gaps.append(float(top2[0] - top2[1]))
        ids.append(int(last.argmax()))
    return ids[len(prompt):], gaps


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    return reference_greedy(lambda ids: hf_logits(model, ids), prompt, n)


def check_greedy(got: list[int], ref: list[int], gaps: list[float], what: str) -> int:
    """How many leading tokens agree; a difference anywhere but after a near-tie fails."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert gaps[i] < TIE_GAP, (f"{what}: token {i} is {a}, reference {b}, top-2 gap "
                                       f"{gaps[i]:.2e}\n got {got}\n ref {ref}")
            return i
    assert len(got) == len(ref), f"{what}: {len(got)} tokens vs the reference's {len(ref)}"
    return len(got)


# ---------------------------------------------------------------------------- the engine
class LogitsTap:
    """Records every logits tensor the engine's model computes (rows in step order)."""

    def __init__(self, model):
        self.rows: list[torch.Tensor] = []
        inner = model.compute_logits

        def compute_logits(hidden):
            out = inner(hidden)
            self.rows.append(out.detach().clone())
            return out
        model.compute_logits = compute_logits

    def take(self) -> torch.Tensor:
        out, self.rows = torch.cat(self.rows), []
        return out


def make_family_llm(path, **extra):
    """The engine the family tests serve a tiny checkpoint with: float32 on the CPU, chunked
    prefill in CHUNK-token pieces, no overlap schedule (rows in step order)."""
    return make_llm(model_path=str(path), dtype="float32", device="cpu",
                    chunked_prefill_size=CHUNK, skip_tokenizer_init=True, max_total_tokens=1024,
                    disable_overlap_schedule=True, **extra)


def first_prompt(seed: int = 7) -> tuple[list[int], torch.Generator]:
    """A 21-token prompt, and the generator the radix-hit prompt draws its tail from."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB - 1, (21,), generator=gen).tolist(), gen


@dataclass
class Cold:
    """What the cold prompt gave: the engine's output, how many generated tokens agree with
    the reference, and the logits rows compared (the engine's, the reference's)."""
    out: Any
    agree: int
    got: torch.Tensor
    want: torch.Tensor


def check_cold(llm, ref_logits: RefLogits, prompt: list[int], ref: list[int],
               gaps: list[float], what: str, tap: LogitsTap) -> Cold:
    """Greedy tokens and every logits row of one fresh prompt against the reference."""
    # prompt logprobs make the engine compute logits for every prompt row
    out = llm.generate(prompt, GREEDY, return_logprob=True, logprob_start_len=0)
    agree = check_greedy(out.output_ids, ref, gaps, what)
    got = tap.take()
    want = ref_logits((prompt + out.output_ids)[:-1])
    assert got.shape == want.shape, (got.shape, want.shape)
    n = len(prompt) + agree  # rows before a near-tie divergence
    assert rel_err(got[:n], want[:n]) < 1e-4, (what, rel_err(got[:n], want[:n]))
    return Cold(out, agree, got[:n], want[:n])


def check_cached(llm, ref_logits: RefLogits, prompt: list[int], gen: torch.Generator,
                 what: str, tap: LogitsTap) -> None:
    """A prompt sharing `prompt`'s first 16 tokens: served partly from the radix cache, its
    greedy tokens and logits rows (last prompt row, then one per decode step) as the
    reference's."""
    prompt2 = prompt[:16] + torch.randint(2, VOCAB - 1, (7,), generator=gen).tolist()
    ref2, gaps2 = reference_greedy(ref_logits, prompt2)
    out2 = llm.generate(prompt2, GREEDY)
    assert out2.cached_tokens >= CHUNK, out2.cached_tokens
    agree2 = check_greedy(out2.output_ids, ref2, gaps2, what)
    got2 = tap.take()
    want2 = ref_logits(prompt2 + out2.output_ids[:-1])[len(prompt2) - 1:]
    assert got2.shape == want2.shape, (got2.shape, want2.shape)
    assert rel_err(got2[:agree2 + 1], want2[:agree2 + 1]) < 1e-4, \
        (what, rel_err(got2[:agree2 + 1], want2[:agree2 + 1]))


def check_through_engine(llm, ref_logits: RefLogits, prompt: list[int], ref: list[int],
                         gaps: list[float], gen: torch.Generator, what: str) -> Cold:
    """The cold prompt (`ref`, `gaps`: the reference's greedy continuation of it), then the
    radix-hit prompt; returns the cold prompt's result for further checks."""
    tap = LogitsTap(llm.engine.runner.model)
    cold = check_cold(llm, ref_logits, prompt, ref, gaps, f"{what} cold", tap)
    check_cached(llm, ref_logits, prompt, gen, f"{what} cached", tap)
    return cold


def check_cold_prompt(llm, hf, prompt: list[int], what: str) -> int:
    """Greedy tokens and every logits row of one fresh prompt against an HF model; returns
    how many generated tokens agree."""
    ref, gaps = hf_greedy(hf, prompt, MAX_NEW)
    tap = LogitsTap(llm.engine.runner.model)
    return check_cold(llm, lambda ids: hf_logits(hf, ids), prompt, ref, gaps, what, tap).agree


# ---------------------------------------------------------------------------- the loader
def checkpoint_names(path) -> list[str]:
    """The tensor names of the checkpoint written to `path` (one model.safetensors)."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def check_every_tensor_consumed(cls, config, path, names: list[str], *,
                                require_experts: bool = True) -> None:
    """Loading the checkpoint into a fresh model maps every stored tensor to a parameter
    (`assign_weights` raises on a tensor without one, and on a parameter or an expert piece
    left unfilled), and the expert tensors (there must be some, unless `require_experts`
    is off) fill the stacked expert weights exactly."""
    model = cls(config)
    seen: list[str] = []
    inner = model._map_weights

    def spy(weights):
        for item in inner(weights):
            seen.append(item[0])
            yield item
    model._map_weights = spy
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in names}
    model.load_weights(tensors.items())
    assert sorted(seen) == sorted(names)
    stored = sum(t.numel() for n, t in tensors.items() if ".experts." in n)
    if require_experts:
        assert stored
    ours = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert ours == stored


# ---------------------------------------------------------------------------- presets
def meta_model(config) -> torch.nn.Module:
    """Our model of `config` on the meta device: shapes only, no memory."""
    from asgl.models.registry import get_model_class

    with torch.device("meta"):
        return get_model_class(config.architectures)(config)


def check_billions(model: torch.nn.Module, published: float, tolerance: float = 0.01) -> None:
    """The model's parameter count is the published one (model card, in billions)."""
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(billions - published) / published < tolerance, billions


# ---------------------------------------------------------------------------- TP
TP_PLANS = [[10, 7, 1, 1], [6, 1, 1, 1], [0, 9, 1, 1]]  # per request: its tokens each step


def tp_sequences(plans: list[list[int]]) -> list[list[int]]:
    """Each request's token ids, as many as its plan brings."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(2, VOCAB - 1, (sum(p),), generator=gen).tolist() for p in plans]


def check_tp2(tmp_path, jobs: list[tuple], refs: list[list[torch.Tensor]],
              names: list[str]) -> None:
    """Runs the jobs (`helpers.tp_worker`'s: model class, config, state dict, plans, token
    ids) on two gloo ranks; each request's logits within 1e-4 of the reference's."""
    from helpers import tp_worker

    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(tp_worker, args=(2, str(tmp_path / "init"), jobs, str(out)),
                                nprocs=2, join=True)
    results = torch.load(out)
    assert len(results) == len(refs)
    for name, got, ref in zip(names, results, refs):
        for g, r in zip(got, ref):
            assert rel_err(g, r) < 1e-4, (name, rel_err(g, r))


def check_hf_tp2(tmp_path, hf_model: Callable[[str], Any], families: list[str],
                 plans: list[list[int]] = TP_PLANS) -> None:
    """`check_tp2` for HF reference models (`hf_model(family)`): our class of each, its
    config as a plain namespace (the ranks need not import transformers, slow to start),
    its in-memory state dict."""
    from asgl.models.registry import get_model_class

    seqs = tp_sequences(plans)
    jobs, refs = [], []
    for family in families:
        hf = hf_model(family)
        config = SimpleNamespace(**hf.config.to_dict())
        jobs.append((get_model_class([type(hf).__name__]), config, dict(hf.state_dict()),
                     plans, seqs))
        refs.append([hf_logits(hf, ids) for ids in seqs])
    check_tp2(tmp_path, jobs, refs, families)


# ---------------------------------------------------------------------------- GGUF
# The names llama.cpp's converter gives the tensors outside the layers.
GGUF_GLOBALS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                "lm_head": "output"}


def gguf_base_ints(c) -> list[tuple[str, int]]:
    """The `<arch>.*` integer fields every (dense or MoE) llama.cpp architecture has."""
    return [("vocab_size", c.vocab_size), ("context_length", c.max_position_embeddings),
            ("embedding_length", c.hidden_size), ("block_count", c.num_hidden_layers),
            ("feed_forward_length", c.intermediate_size),
            ("attention.head_count", c.num_attention_heads),
            ("attention.head_count_kv", c.num_key_value_heads),
            ("attention.key_length", c.head_dim), ("attention.value_length", c.head_dim)]


def gguf_tensor_name(name: str, layer_names: dict[str, str]) -> str:
    """llama.cpp's name of an HF tensor; `layer_names`: HF module path in a layer -> GGUF."""
    base, _, suffix = name.rpartition(".")
    if base in GGUF_GLOBALS:
        return f"{GGUF_GLOBALS[base]}.{suffix}"
    layer, part = base.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{layer_names[part]}.{suffix}"


def finish_gguf(w) -> None:
    """The tokenizer's special ids (the files have no vocabulary), then the file."""
    import gguf

    for key, value in [("bos_token_id", 1), ("eos_token_id", EOS), ("padding_token_id", 0)]:
        w.add_key_value(f"tokenizer.ggml.{key}", value, gguf.GGUFValueType.UINT32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
