"""SGLang flags that asgl accepts but does not implement are reported, not ignored."""

import logging

from asgl.config import EngineConfig
from asgl.engine.engine import _warn_unimplemented


def test_unimplemented_flags_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="asgl.engine.engine"):
        _warn_unimplemented(EngineConfig())
        assert not caplog.records
        _warn_unimplemented(EngineConfig(enable_torch_compile=True))
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "--enable-torch-compile is not implemented" in text


def test_cli_parses_graph_flags():
    cfg = EngineConfig.from_cli(["--cuda-graph-max-tokens", "512", "--cuda-graph-max-bs", "96",
                                 "--schedule-policy", "dfs-weight"])
    assert (cfg.cuda_graph_max_tokens, cfg.cuda_graph_max_bs) == (512, 96)
    assert cfg.schedule_policy == "dfs-weight"


def test_cuda_graph_max_tokens_must_not_be_negative():
    import pytest

    from asgl.config import ConfigError

    with pytest.raises(ConfigError, match="cuda-graph-max-tokens"):
        EngineConfig(cuda_graph_max_tokens=-1)
    assert EngineConfig(cuda_graph_max_tokens=0).cuda_graph_max_tokens == 0
