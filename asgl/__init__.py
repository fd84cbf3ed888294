"""asgl: a fast asyncio-native serving engine for LLMs, with a language for LLM programs."""

from asgl.config import EngineConfig
from asgl.engine.engine import Engine
from asgl.engine.outputs import GenerateOutput, StreamChunk
from asgl.engine.sampling_params import InvalidRequest, SamplingParams
from asgl.engine.sync_engine import LLM

__all__ = ["Engine", "EngineConfig", "GenerateOutput", "InvalidRequest", "LLM",
           "SamplingParams", "StreamChunk"]
__version__ = "0.1.0"
