"""Images through the scheduler, with exact values: the radix cache keys image positions by
the image's digest (the same image shares its KV, another one misses from its first
position), a prefill chunk that splits an image lists exactly the image rows it computes,
and M-RoPE images shift the 1-D positions of the text after them (decode steps too)."""

from __future__ import annotations

from asgl.engine.contracts.multimodal import MMInputs, MMItem
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.scheduler.req import Req
from test_scheduler_steps import Harness, plan

IMG = 7  # the image token id in these prompts


def _req(h: Harness, rid: str, prompt: list[int], items: list[MMItem], max_new: int = 2) -> Req:
    h.clock += 1.0
    mm = MMInputs(items)
    req = Req(rid=rid, prompt_ids=prompt, seed=0, arrival_time=h.clock,
              sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=True), mm=mm,
              cache_prompt_ids=mm.cache_ids(prompt))
    h.sched.add(req)
    return req


def _chunks(batch) -> list[tuple[int, int, int, int]]:
    return [(c.item.digest, c.start, c.end, c.dest) for c in batch.forward.extra.get("mm", [])]


def test_cache_keys_and_chunks_of_split_images():
    h = Harness(capacity=64, chunk=4)
    # prompt: 2 text, image A (5 positions), 1 text, image B (3 positions), 1 text
    prompt = [1, 2] + [IMG] * 5 + [3] + [IMG] * 3 + [4]
    items = [MMItem(digest=101, offset=2, length=5), MMItem(digest=202, offset=8, length=3)]
    a = _req(h, "a", prompt, items)
    assert a.key_ids[:2] == [1, 2] and len(set(a.key_ids[2:7])) == 1
    assert a.key_ids[2] not in (IMG, a.key_ids[8]) and a.key_ids[7] == 3
    steps = [h.step() for _ in range(3)]  # 12 prompt tokens in chunks of 4
    assert [plan(b) for b in steps] == [[("a", 0, 4)], [("a", 4, 4)], [("a", 8, 4)]]
    # (digest, first feature row, end, token row): A is split 2 + 3, B lies in the last
    assert [_chunks(b) for b in steps] == [[(101, 0, 2, 2)], [(101, 2, 5, 0)],
                                           [(202, 0, 3, 0)]]
    assert steps[2].forward.input_ids.tolist() == [IMG, IMG, IMG, 4]  # real ids reach it
    h.step()  # the last output token; a finishes and its tokens stay cached

    same = _req(h, "same", prompt[:8] + [5, 6], items[:1])  # image A again, then new text
    other = _req(h, "other", prompt[:8] + [5, 6],
                 [MMItem(digest=103, offset=2, length=5)])  # one pixel off: another digest
    batch = h.schedule()
    # "same" hits the cache through the whole image (and the "3" after it); "other" misses
    # from the image's first position on, and its image rows are computed (4-token budget)
    assert plan(batch) == [("same", 8, 2), ("other", 2, 2)]
    assert same.num_cached == 8 and other.num_cached == 2
    assert _chunks(batch) == [(103, 0, 2, 2)]  # A is not encoded again; the other one is


def test_mrope_shifts_positions_after_an_image():
    h = Harness(capacity=64, chunk=5)
    # image of 6 positions (a 2 x 3 grid: rotary advance 3) after 2 text tokens
    prompt = [1, 2] + [IMG] * 6 + [3, 4]
    item = MMItem(digest=9, offset=2, length=6, mrope=[[0] * 6, [0, 0, 0, 1, 1, 1],
                                                       [0, 1, 2, 0, 1, 2]], advance=3)
    a = _req(h, "a", prompt, [item], max_new=2)
    assert a.mm.shift_before == [0] and a.mm.shift_after == [-3]
    b1, b2 = h.step(), h.step()
    # text positions 0, 1; image rows keep their sequence positions until the model gives
    # them 3-D ones (from rope_start 2); the text after the image resumes at 2 + 3 = 5
    assert b1.forward.positions.tolist() == [0, 1, 2, 3, 4]
    assert b2.forward.positions.tolist() == [5, 6, 7, 5, 6]
    assert [(c.start, c.end, c.dest, c.rope_start) for c in b2.forward.extra["mm"]] == \
        [(3, 6, 0, 2)]
    decode = h.step()  # the first output token: sequence position 10, rotary 7
    assert plan(decode) == [("a", 10, 1)] and decode.forward.positions.tolist() == [7]
