"""--sampling-backend: which draw a batch gets. FlashInfer's kernels (checked against the
exact distribution on the GPU by bench/gpu_checks.py sampling) mix the row's position
into their randomness, so batches with an explicitly seeded request keep the pytorch draw,
whose seeded results do not depend on the batch."""

import torch

from asgl.engine.scheduler.req import Req
from asgl.engine.sampling.sampler import Sampler, SamplingBatch
from asgl.engine.contracts.sampling_params import SamplingParams

CPU = torch.device("cpu")
V = 64


def _req(i: int, **sp) -> Req:
    return Req(rid=f"r{i}", prompt_ids=[1, 2, 3], sampling=SamplingParams(**sp), seed=1000 + i)


def test_seeded_flag():
    assert not SamplingBatch.from_reqs([_req(0, temperature=1.0)], V).seeded
    assert SamplingBatch.from_reqs([_req(0, temperature=1.0), _req(1, temperature=0.7, seed=5)],
                                   V).seeded
    # a greedy request's seed draws nothing
    assert not SamplingBatch.from_reqs([_req(0, temperature=1.0), _req(1, temperature=0.0, seed=5)],
                                       V).seeded


def test_seeded_batches_keep_the_batch_invariant_draw():
    """With the flashinfer backend a seeded batch takes the pytorch draw (flashinfer itself
    is never imported here: the CPU has none), so its tokens equal the pytorch backend's."""
    logits = torch.randn(4, V)
    reqs = [_req(i, temperature=0.9, top_p=0.8, seed=i) for i in range(4)]
    sb = SamplingBatch.from_reqs(reqs, V).to(CPU)
    got = Sampler("flashinfer").sample(logits, sb).next_token_ids
    assert torch.equal(got, Sampler("pytorch").sample(logits, sb).next_token_ids)


def test_greedy_rows_stay_greedy_with_the_flashinfer_draw(monkeypatch):
    """In a batch mixing greedy and sampled rows, the flashinfer draw serves the sampled
    rows only: greedy rows are the argmax whichever backend draws (the draw itself is
    replaced here by one that always picks token 0, so the override is what is checked)."""
    import asgl.engine.sampling.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "_draw_flashinfer",
                        lambda logits, sb: torch.zeros(logits.shape[0], dtype=torch.int64))
    logits = torch.randn(6, V)
    logits[:, 0] = -100.0  # token 0 is never the argmax
    reqs = [_req(i, temperature=0.0 if i % 2 else 0.8) for i in range(6)]
    sb = SamplingBatch.from_reqs(reqs, V).to(CPU)
    ids = Sampler("flashinfer").sample(logits, sb).next_token_ids
    assert torch.equal(ids[1::2], logits[1::2].argmax(-1))
    assert torch.equal(ids[0::2], torch.zeros(3, dtype=torch.int64))
