"""Per-request work budgets (issue 16): the killer rows `n: 128` x 64 tokens, echo +
logprobs 20 on a 4,000-token prompt, and prompt logprobs top-20 on 4 x 2,000 tokens get a
400 naming their flag (--max-request-tokens, --max-prompt-logprobs); smaller requests pass.
The handlers are served in-process over a fake engine with the embedded model's context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from asgl.config import EngineConfig
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.server import limits
from asgl.server.app import build_app
from asgl.server.errors import ApiError
from asgl.server.generation import Job
from asgl.server.metrics import Metrics
from asgl.server.state import CPU_PROMPT_LOGPROBS, CPU_REQUEST_TOKENS, ServerState
from asgl.server.tokens import TokenTexts

CONTEXT, VOCAB = 8192, 49152


def _engine(device: str = "cpu") -> SimpleNamespace:
    return SimpleNamespace(context_len=CONTEXT, vocab_size=VOCAB, tokenizer=None,
                           supports_grammar=False, scheduler=SimpleNamespace(waiting=[]),
                           runner=SimpleNamespace(device=SimpleNamespace(type=device)),
                           stalled=None)


def _state(device: str = "cpu", **cfg) -> ServerState:
    return ServerState(engine=_engine(device), config=EngineConfig(**cfg), metrics=Metrics(),
                       model_name="m", token_texts=TokenTexts(None))


def _ids(n: int) -> list[int]:
    return [100 + i % 1000 for i in range(n)]


KILLERS = [
    ("/generate", {"input_ids": _ids(10), "sampling_params": {"n": 128, "max_new_tokens": 64}},
     "--max-request-tokens"),
    ("/v1/completions", {"prompt": _ids(10), "n": 128, "max_tokens": 64},
     "--max-request-tokens"),
    ("/v1/completions", {"prompt": _ids(4000), "echo": True, "logprobs": 20, "max_tokens": 1},
     "--max-prompt-logprobs"),
    ("/generate", {"input_ids": [_ids(2000)] * 4, "return_logprob": True,
                   "logprob_start_len": 0, "top_logprobs_num": 20,
                   "sampling_params": {"max_new_tokens": 1}}, "--max-prompt-logprobs"),
]


@pytest.mark.parametrize("path, body, flag", KILLERS)
async def test_killer_rows_are_400_naming_the_flag(path, body, flag):
    app = build_app(_engine(), EngineConfig())
    async with TestClient(TestServer(app)) as client:  # an ephemeral port
        r = await client.post(path, json=body)
        err = (await r.json())["error"]
    assert r.status == 400, err
    assert flag in err["message"]


def _job(prompt: int, n: int = 1, max_new=None, start: int = -1) -> Job:
    return Job(rid="r", input_ids=_ids(prompt), params=SamplingParams(n=n, max_new_tokens=max_new),
               return_logprob=start >= 0, logprob_start_len=start)


def test_budgets_and_their_defaults():
    cpu, gpu = _state("cpu"), _state("cuda")
    assert cpu.max_request_tokens == CPU_REQUEST_TOKENS < gpu.max_request_tokens
    assert cpu.max_prompt_logprobs == CPU_PROMPT_LOGPROBS < gpu.max_prompt_logprobs
    limits.check_work(cpu, [_job(10, n=1)])  # one sequence: the context bounds it
    limits.check_work(cpu, [_job(10, n=64, max_new=64)])  # 4,096: at the budget
    limits.check_work(gpu, [_job(10, n=128, max_new=64)])
    limits.check_work(cpu, [_job(1024, start=0)])
    with pytest.raises(ApiError, match=r"8192 tokens over 128 sequences.*--max-request-tokens"):
        limits.check_work(cpu, [_job(10, n=128, max_new=64)])
    with pytest.raises(ApiError, match="--max-request-tokens"):  # absent max_tokens: the room
        limits.check_work(cpu, [_job(10, n=2)])
    with pytest.raises(ApiError, match="1025 prompt positions"):
        limits.check_work(cpu, [_job(1025, start=0)])
    flags = _state("cpu", max_request_tokens=10 ** 6, max_prompt_logprobs=10 ** 5)
    limits.check_work(flags, [_job(10, n=128, max_new=64), _job(4000, start=0)])
