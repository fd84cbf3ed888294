"""The Responses API's answer (responses_api.py builds the request): output items
(reasoning, message, function calls), the response object, and the streamed events
`response.created` ... `response.completed` with their sequence numbers."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

import msgspec

from asgl.server.chat_parsing import ChoiceParser
from asgl.engine.contracts.outputs import StreamChunk
from asgl.server.generation import Generation, deliver_all
from asgl.server.openai_common import response_model
from asgl.server.reasoning_parsers import make_parser
from asgl.server.sse import SSEWriter
from asgl.server.state import ServerState
from asgl.server.tool_calls import ToolSetup


class ResponseView:
    """One response being produced: its output items, the final object, the events."""

    def __init__(self, state: ServerState, req: Any, gen: Generation,
                 resp_id: str, tools: Optional[ToolSetup], fmt: Any,
                 reasoning: Optional[str]):
        self.state, self.req, self.gen, self.id = state, req, gen, resp_id
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.fmt, self.reasoning = fmt, reasoning
        self.created = int(time.time())
        self.model = response_model(state, req.model)
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.parser = ChoiceParser(make_parser(reasoning) if reasoning else None,
                                   fmt.parser(self.tools.tools) if self.tools else None)
        self._calls_out: list[dict] = []

    def output_messages(self) -> list[dict]:
        """This response as chat messages, for a continuation."""
        msg: dict = {"role": "assistant", "content": self.parser.content or None}
        if self.parser.calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in self.parser.calls]
        return [msg]

    def _output(self) -> list[dict]:
        items: list[dict] = []
        if self.parser.reasoning:
            items.append({"type": "reasoning", "id": f"rs_{self.id[5:]}", "summary": [],
                          "content": [{"type": "reasoning_text",
                                       "text": self.parser.reasoning}]})
        if self.parser.content or not self.parser.calls:
            items.append(self._message(self.parser.content, "completed"))
        for c in self.parser.calls:
            items.append({"type": "function_call", "id": f"fc_{c.id}", "call_id": c.id,
                          "name": c.name, "arguments": c.arguments, "status": "completed"})
        return items

    def _message(self, text: str, status: str) -> dict:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [],
                             "logprobs": []}] if status == "completed" or text else []}

    def _response(self, status: str, output: list[dict]) -> dict:
        choice = self.gen.choices[0]
        reason = (choice.finish_reason or {}).get("type")
        incomplete = None
        if status == "completed" and reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        prompt = len(self.gen.job.input_ids)
        out_tokens = len(choice.output_ids)
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "error": None, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [], "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": req.truncation or "disabled", "user": req.user,
            "metadata": req.metadata or {},
            "usage": None if status == "in_progress" else {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": choice.cached_tokens},
                "output_tokens": out_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + out_tokens},
        }

    def final(self) -> dict:
        self.parser.feed(self.gen.choices[0].text)
        self.parser.finish()
        return self._response("completed", self._output())

    async def stream(self, sse: SSEWriter) -> dict:
        seq = 0

        def send(event: dict) -> None:  # written at once (inside the engine's step too)
            nonlocal seq
            event["sequence_number"] = seq
            seq += 1
            sse.emit_raw(f"event: {event['type']}\n".encode() + b"data: "
                         + msgspec.json.encode(event) + b"\n\n")

        send({"type": "response.created", "response": self._response("in_progress", [])})
        send({"type": "response.in_progress", "response": self._response("in_progress", [])})
        text_open = False
        index = 0  # output index of the message item
        reasoning_seen = False

        def on_chunk(_: int, chunk: StreamChunk) -> None:
            nonlocal text_open, index, reasoning_seen
            thought, text, calls = self.parser.feed(chunk.text)
            if chunk.finished:
                t2, x2, c2 = self.parser.finish()
                thought, text, calls = thought + t2, text + x2, calls + c2
            if thought:
                reasoning_seen = True
                send({"type": "response.reasoning_text.delta", "item_id":
                            f"rs_{self.id[5:]}", "output_index": 0, "content_index": 0,
                            "delta": thought})
            if text:
                if not text_open:
                    text_open = True
                    index = 1 if reasoning_seen or self.parser.reasoning else 0
                    send({"type": "response.output_item.added", "output_index": index,
                                "item": self._message("", "in_progress")})
                    send({"type": "response.content_part.added",
                                "item_id": self.msg_id, "output_index": index,
                                "content_index": 0, "part": {"type": "output_text",
                                                             "text": "", "annotations": []}})
                send({"type": "response.output_text.delta", "item_id": self.msg_id,
                            "output_index": index, "content_index": 0, "delta": text,
                            "logprobs": []})

        await deliver_all([self.gen], on_chunk)
        output = self._output()
        if text_open:
            send({"type": "response.output_text.done", "item_id": self.msg_id,
                        "output_index": index, "content_index": 0,
                        "text": self.parser.content, "logprobs": []})
            send({"type": "response.content_part.done", "item_id": self.msg_id,
                        "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": self.parser.content,
                                 "annotations": []}})
        for k, item in enumerate(output):
            if item["type"] == "function_call":
                send({"type": "response.output_item.added", "output_index": k,
                            "item": {**item, "arguments": "", "status": "in_progress"}})
                send({"type": "response.function_call_arguments.delta",
                            "item_id": item["id"], "output_index": k,
                            "delta": item["arguments"]})
                send({"type": "response.function_call_arguments.done",
                            "item_id": item["id"], "output_index": k,
                            "arguments": item["arguments"]})
            if item["type"] != "message" or text_open:
                send({"type": "response.output_item.done", "output_index": k,
                            "item": item})
        response = self._response("completed", output)
        send({"type": "response.completed", "response": response})
        return response
