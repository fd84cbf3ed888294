"""Backends of the frontend language: where a program's gen/select run."""

from asgl.lang.backends.anthropic import Anthropic
from asgl.lang.backends.base import Backend, BackendError
from asgl.lang.backends.litellm import LiteLLM
from asgl.lang.backends.openai import OpenAI
from asgl.lang.backends.runtime import Runtime
from asgl.lang.backends.runtime_endpoint import RuntimeEndpoint
from asgl.lang.backends.vertexai import VertexAI

__all__ = ["Anthropic", "Backend", "BackendError", "LiteLLM", "OpenAI", "Runtime",
           "RuntimeEndpoint", "VertexAI"]
