"""Models from the hub (asgl/models/hub.py) against a local stand-in of the Hugging Face hub
(tests/hub_standin.py): the real `huggingface_hub` client downloads, `asgl serve` serves,
a second start with the stand-in down and HF_HUB_OFFLINE=1 uses the cache, `--revision`
picks the other revision's weights, a GGUF repo file by `:QUANT` tag or `--gguf-file`, and
the errors for a gated repo, a missing revision and no network.

Served outputs are checked against HF transformers (float32, greedy) on the same tiny random
Llama weights, saved with `save_pretrained` next to the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

import pytest
import torch

from hub_standin import Repo, Revision, StandinHub, commit_sha
from server_fixture import ServerProcess, free_port

PROMPT_IDS = [1, 504, 3458, 314, 253, 1345, 28, 9853]
NEW_TOKENS = 8


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # big enough logits that the greedy choice has no near ties
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
    return model


def _greedy(model, ids: list[int]) -> list[int]:
    prompt_len, ids = len(ids), list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[prompt_len:]


@pytest.fixture(scope="module")
def repos(tmp_path_factory, smol_conversion):
    """org/tiny (revisions main and v2, other weights), org/gated (token "hf_test"),
    org/smol-gguf (the embedded SmolLM2 GGUF, and a decoy Q8_0 file never fetched);
    returns (repos, expected greedy ids per revision)."""
    from conftest import GGUF_NAME, smol_dir

    _, smol, _ = smol_conversion
    root = tmp_path_factory.mktemp("hub-repos")
    expected, revisions = {}, {}
    for rev, seed in (("main", 0), ("v2", 1)):
        model = _tiny_llama(seed)
        folder = root / rev
        model.save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(os.path.join(smol.tokenizer_dir, name), folder / name)
        (folder / "README.md").write_text("not fetched: no weights or configs in it\n")
        files = {name: str(folder / name) for name in os.listdir(folder)}
        revisions[rev] = Revision(commit_sha(rev), files)
        expected[rev] = _greedy(model, PROMPT_IDS)
    decoy = root / "smol.Q8_0.gguf"
    decoy.write_bytes(b"GGUF decoy: must never be downloaded")
    gguf = {GGUF_NAME: os.path.join(smol_dir(), GGUF_NAME), "smol.Q8_0.gguf": str(decoy)}
    return {"org/tiny": Repo(revisions),
            "org/gated": Repo({"main": revisions["main"]}, gated_token="hf_test"),
            "org/smol-gguf": Repo({"main": Revision(commit_sha("gguf"), gguf)})}, expected


def _generate(server: ServerProcess, ids: list[int] = PROMPT_IDS) -> list[int]:
    body = json.dumps({"input_ids": ids, "sampling_params": {
        "max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}}).encode()
    req = urllib.request.Request(server.url + "/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["output_ids"]


def _serve(args: list[str]) -> ServerProcess:
    server = ServerProcess(["--dtype", "float32", "--disable-radix-cache", *args], free_port())
    server.wait_ready()
    return server


def test_serve_from_hub_revision_then_offline_from_cache(repos, tmp_path, monkeypatch):
    repo_table, expected = repos
    assert expected["main"] != expected["v2"]  # the revisions' weights differ
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with StandinHub(repo_table) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        server = _serve(["--model-path", "org/tiny"])
        try:
            assert _generate(server) == expected["main"]
            assert server.get_json("/v1/models")["data"][0]["id"] == "org/tiny"
            log = server.log()
            assert "model org/tiny: fetching weights, config and tokenizer from " + hub.url in log
            assert "Fetching " in log and "files" in log  # huggingface_hub's progress bar
        finally:
            server.stop()
        fetched = [r.split("/")[-1] for r in hub.requests if r.startswith("GET /org/tiny/")]
        assert "README.md" not in fetched and "model.safetensors" in fetched
        server = _serve(["--model-path", "org/tiny", "--revision", "v2"])
        try:
            assert _generate(server) == expected["v2"]
            assert "--revision does nothing" not in server.log()
        finally:
            server.stop()
    # the stand-in is down: the cache answers, and nothing is asked of the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = _serve(["--model-path", "org/tiny"])
    try:
        assert _generate(server) == expected["main"]
    finally:
        server.stop()
    cache = tmp_path / "hf-home" / "hub" / "models--org--tiny" / "snapshots"
    assert sorted(os.listdir(cache)) == sorted([commit_sha("main"), commit_sha("v2")])


@pytest.fixture
def hub_env(repos, tmp_path, monkeypatch):
    """A running stand-in, an empty cache, for in-process resolves (huggingface_hub read
    HF_HOME and HF_HUB_OFFLINE at its import: its constants are set here)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with StandinHub(repos[0]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def _download(path: str, revision=None, gguf_file=None) -> str:
    from asgl.models import hub

    return hub.download(hub.parse_hub_id(path, gguf_file), revision)


def test_gated_repo_needs_a_token(hub_env, monkeypatch):
    from asgl.engine.contracts.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"org/gated is gated: .*set HF_TOKEN .*none is set"):
        _download("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ModelLoadError, match="granted access"):
        _download("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    local = _download("org/gated")
    assert os.path.isfile(os.path.join(local, "model.safetensors"))


def test_missing_revision_and_repo(hub_env):
    from asgl.engine.contracts.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"--revision 'v9': no such branch, tag or commit "
                                             r"in hub repo org/tiny"):
        _download("org/tiny", revision="v9")
    with pytest.raises(ModelLoadError, match=r"hub repo org/nope: not found on http://127"):
        _download("org/nope")


def test_no_network_and_offline_without_cache(hub_env, monkeypatch):
    from huggingface_hub import constants

    from asgl.engine.contracts.errors import ModelLoadError

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with pytest.raises(ModelLoadError, match=rf"org/tiny: not in the cache .*{dead} cannot be "
                                             "reached"):
        _download("org/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the cache .*HF_HUB_OFFLINE=1 forbids"):
        _download("org/tiny")


def test_gguf_repo_by_tag_and_by_file(hub_env, smol_conversion, monkeypatch):
    """`ORG/NAME:Q4_1` and `--gguf-file` fetch that one file (not the decoy), and the loader
    converts it like the embedded file: the same bytes, so the same conversion entry."""
    from conftest import GGUF_NAME

    from asgl.config import EngineConfig
    from asgl.models.loader import resolve_model

    root, embedded, _ = smol_conversion
    monkeypatch.setenv("ASGL_CACHE_DIR", str(root))
    source = resolve_model(EngineConfig(model_path="org/smol-gguf:q4_1"))
    assert source.name == "org/smol-gguf" and source.model_path.endswith(GGUF_NAME)
    assert source.weights_dir == embedded.weights_dir
    assert not any("Q8_0" in r for r in hub_env.requests)
    by_file = resolve_model(EngineConfig(model_path="org/smol-gguf", gguf_file=GGUF_NAME))
    assert by_file.weights_dir == embedded.weights_dir
    from asgl.engine.contracts.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no .gguf file matches the tag 'Q2_K'"):
        resolve_model(EngineConfig(model_path="org/smol-gguf:Q2_K"))


def test_serve_gguf_repo_by_tag(repos, smol_conversion, hf_smol, tmp_path, monkeypatch):
    """`asgl serve --model-path org/smol-gguf:Q4_1`: the one GGUF file is fetched from the
    stand-in and served; greedy tokens equal HF transformers' on the same file."""
    from conftest import reference_threads

    root, _, _ = smol_conversion
    model, tokenizer = hf_smol
    ids = tokenizer("The capital of France is").input_ids
    with reference_threads():
        expected = _greedy(model, ids)
    monkeypatch.setenv("ASGL_CACHE_DIR", str(root))  # the session's conversion: no redo
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with StandinHub(repos[0]) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        server = _serve(["--model-path", "org/smol-gguf:Q4_1"])
        try:
            assert _generate(server, ids) == expected
            assert server.get_json("/v1/models")["data"][0]["id"] == "org/smol-gguf"
        finally:
            server.stop()
        assert not any("Q8_0" in r for r in standin.requests)


def test_presets_keep_their_names_and_preflight_takes_hub_ids(hub_env):
    from asgl.config import ConfigError, EngineConfig
    from asgl.models.loader import resolve_model
    from asgl.server.launch import check_model_path, warn_no_effect_flags

    preset = resolve_model(EngineConfig(model_path="meta-llama/Llama-3.1-8B",
                                        load_format="dummy", skip_tokenizer_init=True))
    assert preset.is_dummy and preset.hf_config.num_hidden_layers == 32
    assert not hub_env.requests  # a preset name never reaches the hub
    # dummy weights for a hub repo that is no preset: its config only
    dummy = resolve_model(EngineConfig(model_path="org/tiny", load_format="dummy"))
    assert dummy.is_dummy and dummy.hf_config.hidden_size == 32
    assert not any(r.endswith("model.safetensors") for r in hub_env.requests)
    check_model_path(EngineConfig(model_path="org/tiny:Q4_K_M"))
    with pytest.raises(ConfigError, match="nor a hub id"):
        check_model_path(EngineConfig(model_path="./missing/model"))
    assert warn_no_effect_flags(EngineConfig(model_path="org/tiny", revision="v2")) is None
    assert "--revision" in warn_no_effect_flags(EngineConfig(revision="v2"))


# --------------------------------------------------------------------------- ModelScope
def test_serve_from_modelscope_with_revision(repos, tmp_path, monkeypatch):
    """SGLANG_USE_MODELSCOPE=true: the same repo through the `modelscope` client and a
    stand-in of ModelScope's API; --revision v2 serves v2's weights."""
    pytest.importorskip("modelscope")
    from modelscope_standin import StandinModelScope

    repo_table, expected = repos
    monkeypatch.setenv("SGLANG_USE_MODELSCOPE", "true")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    with StandinModelScope(repo_table) as ms:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms.url)
        server = _serve(["--model-path", "org/tiny", "--revision", "v2"])
        try:
            assert _generate(server) == expected["v2"]
            assert "model org/tiny@v2: fetching weights, config and tokenizer from " \
                   "ModelScope" in server.log()
        finally:
            server.stop()
        assert any("Revision=v2&FilePath=model.safetensors" in r for r in ms.requests)
        assert not any("README.md" in r for r in ms.requests)
        from asgl.models import hub

        main_dir = hub.download(hub.parse_hub_id("org/tiny"))
        v2_dir = hub.download(hub.parse_hub_id("org/tiny"), "v2")
        assert main_dir != v2_dir and os.path.isfile(os.path.join(main_dir, "model.safetensors"))
        assert os.path.getsize(os.path.join(main_dir, "model.safetensors")) == \
            os.path.getsize(os.path.join(v2_dir, "model.safetensors"))


def test_modelscope_without_the_package_is_a_clear_error(monkeypatch):
    import sys

    from asgl.engine.contracts.errors import ModelLoadError
    from asgl.models import hub

    monkeypatch.setenv("ASGL_USE_MODELSCOPE", "1")
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)
    with pytest.raises(ModelLoadError, match=r"modelscope package is not installed: pip "
                                             r"install 'asgl\[modelscope\]'"):
        hub.download(hub.parse_hub_id("org/tiny"))


def test_interrupted_download_resumes(repos, tmp_path, monkeypatch):
    """The connection drops 11 MB into the 12.6 MB model.safetensors: the client keeps what
    it wrote (whole 10 MiB chunks) and asks for the rest with a Range request; the file is
    whole (its safetensors header checks out against its size)."""
    from huggingface_hub import constants

    from asgl.models import hub
    from asgl.models.loader import _safetensors_header

    source = repos[0]["org/tiny"].revisions["main"].files["model.safetensors"]
    assert os.path.getsize(source) > 11_000_000 > constants.DOWNLOAD_CHUNK_SIZE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with StandinHub(repos[0], cut={"model.safetensors": 11_000_000}) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        local = hub.download(hub.parse_hub_id("org/tiny"))
        gets = [r for r in standin.requests if r.startswith("GET") and
                r.endswith("model.safetensors")]
        resumed = list(standin.ranges)
    assert len(gets) == 2  # the cut one and the resumed one
    assert resumed == [("model.safetensors", constants.DOWNLOAD_CHUNK_SIZE)]
    path = os.path.join(local, "model.safetensors")
    assert os.path.getsize(path) == os.path.getsize(source)
    assert _safetensors_header(path)
