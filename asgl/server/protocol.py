"""Request and response bodies of the HTTP API, as msgspec Structs.

Requests are decoded straight from the body bytes into these structs, so a wrong type or
a missing field is a `msgspec.ValidationError` (HTTP 400 naming the field path) before any
handler code runs. Request structs forbid unknown fields: a field we don't implement is a
clear 400, never silently ignored. Optional OpenAI parameters are `Optional[...] = None`
because real clients send explicit nulls; the handlers fill in OpenAI's defaults.

Response structs follow the official OpenAI shapes field for field (key order included);
fields that OpenAI omits rather than nulls are `UNSET` here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from msgspec import UNSET, Meta, UnsetType

from asgl.config import STOP_STRING_CHARS_CEILING, STOP_STRINGS_CEILING
from asgl.engine.contracts.sampling_params import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

_REQ = dict(forbid_unknown_fields=True, kw_only=True)

# Fixed ranges of OpenAI fields, enforced when the body is decoded and shown in /openapi.json
# (the same as SamplingParams.validate's and limits.py's). Limits that depend on the server's
# flags (stop strings, tools, the context) are the engine's ceilings here; openapi.py shows the
# configured values, and limits.py enforces them.
_NonNegative = Annotated[int, Meta(ge=0)]
_Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
_Stop = Union[Annotated[str, Meta(max_length=STOP_STRING_CHARS_CEILING)],
              Annotated[list[Annotated[str, Meta(max_length=STOP_STRING_CHARS_CEILING)]],
                        Meta(max_length=STOP_STRINGS_CEILING)], None]
MAX_N = 128  # choices per prompt
MAX_TOP_LOGPROBS = 20
_TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]

# --------------------------------------------------------------------------- SGLang native


class GenerateRequest(msgspec.Struct, **_REQ):
    """POST /generate: one prompt or a batch (a list of texts or of id lists)."""
    text: Union[str, list[str], None] = None
    # list[int] or list[list[int]]: msgspec cannot tell two array types apart in a Union,
    # so the shape is checked by the handler.
    input_ids: Optional[list[Any]] = None
    sampling_params: Union[dict[str, Any], list[dict[str, Any]], None] = None
    rid: Union[str, list[str], None] = None
    return_logprob: Union[bool, list[bool]] = False
    logprob_start_len: Union[int, list[int]] = -1
    top_logprobs_num: Union[int, list[int]] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    image_data: Any = None  # vision models: server/images.py
    video_data: Any = None  # vision models with video: a list of frames per video
    # SGLang fields we do not implement: accepted only when absent or null
    lora_path: Any = None
    modalities: Any = None
    token_ids_logprob: Any = None  # compat.py refuses it: not supported yet
    cache_salt: Optional[str] = None  # also accepted inside sampling_params


class AbortRequest(msgspec.Struct, **_REQ):
    rid: Union[str, list[str]] = ""
    abort_all: bool = False  # SGLang: abort every request in flight


class MetaInfo(msgspec.Struct):
    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: Optional[dict]
    e2e_latency: float
    # each [logprob, token_id, token_text_or_null], as SGLang sends them
    input_token_logprobs: Union[list, UnsetType] = UNSET
    output_token_logprobs: Union[list, UnsetType] = UNSET
    input_top_logprobs: Union[list, UnsetType] = UNSET
    output_top_logprobs: Union[list, UnsetType] = UNSET


class GenerateResponse(msgspec.Struct):
    text: str
    output_ids: list[int]
    meta_info: MetaInfo
    index: Union[int, UnsetType] = UNSET  # set on batch stream events


# --------------------------------------------------------------------------- OpenAI requests


class StreamOptions(msgspec.Struct, **_REQ):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # accepted; we never pad chunks
    continuous_usage_stats: Optional[bool] = None  # vLLM: usage so far on every chunk


class _SamplingFields(msgspec.Struct, **_REQ):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""
    model: Optional[str] = None
    frequency_penalty: Optional[_Penalty] = None
    presence_penalty: Optional[_Penalty] = None
    logit_bias: Optional[dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]]] = None
    max_tokens: Optional[_NonNegative] = None
    n: Optional[Annotated[int, Meta(ge=1, le=MAX_N)]] = None
    seed: Optional[int] = None
    stop: _Stop = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[Annotated[float, Meta(ge=0.0, le=1e4)]] = None
    top_p: Optional[Annotated[float, Meta(gt=0.0, le=1.0)]] = None
    user: Optional[str] = None
    # extensions that SGLang and vLLM accept (the openai SDK sends them via extra_body)
    top_k: Optional[Annotated[int, Meta(ge=-1)]] = None
    min_p: Optional[Annotated[float, Meta(ge=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[float, Meta(ge=MIN_REPETITION_PENALTY,
                                                       le=MAX_REPETITION_PENALTY)]] = None
    min_tokens: Optional[_NonNegative] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    json_schema: Union[str, dict[str, Any], None] = None  # SGLang / vLLM extension
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema"}}
    response_format: Optional[dict[str, Any]] = None
    stop_regex: Union[str, list[str], None] = None  # SGLang extension
    cache_salt: Optional[str] = None  # vLLM extension: a private prefix-cache namespace


class CompletionRequest(_SamplingFields, **_REQ):
    # str, list[str], list[int] or list[list[int]] (checked by the handler)
    prompt: Union[str, list[Any]]
    echo: Optional[bool] = None
    logprobs: Optional[_TopLogprobs] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: Optional[str] = None
    image_url: Any = None
    video_url: Any = None  # {"url": [frame URLs]}: a video as its frames (vision models)
    input_audio: Any = None


class ChatMessage(msgspec.Struct, kw_only=True):
    """Unknown keys are allowed (vLLM passes them to the template: compat.py reads them
    from the body); unknown roles too, when the template renders them."""
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None
    reasoning_content: Optional[str] = None


class ChatCompletionRequest(_SamplingFields, **_REQ):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[_NonNegative] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[_TopLogprobs] = None
    add_generation_prompt: Optional[bool] = None  # extension: False to continue a message
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Any = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Optional[str] = None
    service_tier: Optional[str] = None
    web_search_options: Any = None
    # vLLM / SGLang extensions (compat.py)
    continue_final_message: Optional[bool] = None
    echo: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    separate_reasoning: Optional[bool] = None


# --------------------------------------------------------------------------- OpenAI responses


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]
    # SGLang: the stop string or token id that ended the choice (None: no stop matched)
    matched_stop: Union[int, str, None, UnsetType] = UNSET


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Union[Usage, None, UnsetType] = UNSET
    system_fingerprint: Optional[str] = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: Optional[list[int]]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: Optional[list[TokenLogprob]]
    refusal: Optional[list[TokenLogprob]] = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    refusal: Optional[str] = None
    tool_calls: Union[list[ToolCall], UnsetType] = UNSET
    reasoning_content: Union[str, None, UnsetType] = UNSET  # with --reasoning-parser


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: Optional[str]
    matched_stop: Union[int, str, None, UnsetType] = UNSET  # SGLang


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class DeltaFunctionCall(msgspec.Struct, omit_defaults=True):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A call's first delta has its id, type and name; later ones add to its arguments."""
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None  # with --reasoning-parser
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[int, str, None, UnsetType] = UNSET  # SGLang, on the last chunk


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Union[Usage, None, UnsetType] = UNSET
    system_fingerprint: Optional[str] = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "asgl"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]
