"""SGLang's engine flags: parsed, validated."""

from asgl.config import EngineConfig


def test_cli_parses_graph_flags():
    cfg = EngineConfig.from_cli(["--cuda-graph-max-tokens", "512", "--cuda-graph-max-bs", "96",
                                 "--schedule-policy", "dfs-weight", "--enable-torch-compile",
                                 "--torch-compile-max-bs", "16"])
    assert (cfg.cuda_graph_max_tokens, cfg.cuda_graph_max_bs) == (512, 96)
    assert cfg.enable_torch_compile and cfg.torch_compile_max_bs == 16
    assert cfg.schedule_policy == "dfs-weight"


def test_cuda_graph_max_tokens_must_not_be_negative():
    import pytest

    from asgl.config import ConfigError

    with pytest.raises(ConfigError, match="cuda-graph-max-tokens"):
        EngineConfig(cuda_graph_max_tokens=-1)
    assert EngineConfig(cuda_graph_max_tokens=0).cuda_graph_max_tokens == 0
    with pytest.raises(ConfigError, match="torch-compile-max-bs"):
        EngineConfig(torch_compile_max_bs=0)
