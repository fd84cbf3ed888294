"""Applies one step's results to its requests: append tokens, check stops, stream deltas.

Runs on the event loop after the worker returns a step. With overlap scheduling the
results arrive one step late, so a request may already be finished (a stop found in the
previous step, or an abort): its extra token is discarded here.
"""

from __future__ import annotations

import logging
from typing import Optional

from asgl.engine.contracts.step import StepOutput
from asgl.engine.contracts.outputs import StreamChunk
from asgl.engine.contracts.outputs import FinishReason
from asgl.engine.scheduler.req import Req
from asgl.engine.scheduler.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


def apply_step_output(batch: ScheduledBatch, out: StepOutput, context_len: int) -> None:
    """Apply one step's results. A request whose own results fail (its sampling row failed
    on the worker, or its grammar, detokenizer or stream raises here) ends with an error;
    every other request of the step is applied as if it were not there."""
    if out.failed_rows:
        for k, why in out.failed_rows.items():
            fail_request(batch.sampling_reqs[k], why)
    for (req, first_pos, count, offset) in batch.prompt_lp_spans:
        try:
            _add_prompt_logprobs(req, out, first_pos, count, offset)
        except Exception as exc:  # noqa: BLE001 - this request's fault only
            fail_request(req, _describe(exc), exc)
    reqs = batch.sampling_reqs
    next_ids = out.next_ids
    k = -1
    while True:
        # (a try costs nothing until it raises: the healthy path is the plain loop)
        try:
            for k, req in enumerate(reqs if k < 0 else reqs[k + 1:], k + 1):
                req.num_inflight -= 1
                if req.finish_reason is not None:
                    continue
                if req.max_new_tokens == 0:  # prompt-logprob-only request: nothing generated
                    _finish(req, FinishReason("length"))
                    continue
                token = next_ids[k]
                req.output_ids.append(token)
                logprob = top = None
                if req.return_logprob and out.logprobs is not None:
                    logprob = [(out.logprobs[k], token)]
                    req.output_logprobs.append(logprob[0])
                    if req.top_logprobs_num and out.top_ids is not None:
                        n = req.top_logprobs_num
                        top = [list(zip(out.top_values[k][:n], out.top_ids[k][:n]))]
                        req.output_top_logprobs.append(top[0])
                # a grammar ends the request when it terminates (or a token slipped its mask)
                reason = req.grammar.accept(token) if req.grammar is not None else None
                reason = reason or _stop_reason(req, token, context_len)
                text = ""
                if req.detok is not None and not (reason and reason.matched == token):
                    text, matched = req.detok.step([token])
                    if matched is not None:
                        reason = FinishReason("stop", matched=matched)
                if reason is not None:
                    if req.detok is not None and not isinstance(reason.matched, str):
                        # text held back for a stop string that never came
                        text += req.detok.flush()
                        if req.detok.matched_stop is not None:  # completed by the flush
                            reason = FinishReason("stop", matched=req.detok.matched_stop)
                    req.finish_reason = reason
                if req.sink is not None:
                    if reason is None and req.sink.collect:  # generate(): no chunk per token
                        req.sink.add_token(req.sink_index, text, token)
                    else:
                        req.sink.put(_chunk(req, text, [token], reason, logprob, top))
            return
        except Exception as exc:  # noqa: BLE001 - request k failed: end it, go on after it
            fail_request(reqs[k], _describe(exc), exc)


def _describe(exc: BaseException) -> str:
    return f"this request failed: {type(exc).__name__}: {exc}"[:500]


def fail_request(req: Req, message: str, exc: Optional[BaseException] = None) -> None:
    """End `req` with an error that is its own (nothing else in its step is touched): no
    detokenizer flush or grammar call, which may be what failed. Its memory is released by
    the scheduler once no step uses it."""
    if exc is not None:
        logger.error("request %s failed; it alone is ended", req.rid, exc_info=exc)
    if req.finished:
        return
    req.finish_reason = FinishReason("abort", message=message)
    if req.sink is not None:
        try:
            req.sink.put(_chunk(req, "", [], req.finish_reason))
        except Exception:  # noqa: BLE001 - the stream itself is broken: nobody to tell
            logger.exception("request %s: its stream failed too", req.rid)


def _stop_reason(req: Req, token: int, context_len: int) -> FinishReason | None:
    sp = req.sampling
    if sp.stop_token_ids and token in sp.stop_token_ids:
        return FinishReason("stop", matched=token)
    if not sp.ignore_eos and token in req.eos_ids:
        return FinishReason("stop", matched=token)
    produced = len(req.output_ids)
    if produced >= req.max_new_tokens or len(req.prompt_ids) + produced >= context_len:
        return FinishReason("length")
    return None


def _chunk(req: Req, text: str, token_ids: list[int], reason: FinishReason | None,
           logprob=None, top=None) -> StreamChunk:
    chunk = StreamChunk(index=req.sink_index, text=text, token_ids=token_ids,
                        finished=reason is not None,
                        finish_reason=reason.to_json() if reason else None,
                        logprobs=logprob, top_logprobs=top)
    if not req.sent_first_chunk or reason is not None:
        req.sent_first_chunk = True
        chunk.prompt_tokens = len(req.prompt_ids)
        chunk.cached_tokens = req.num_cached
        if req.first_scheduled_time is not None:
            chunk.queue_time = max(0.0, req.first_scheduled_time - req.arrival_time)
    if reason is not None:
        chunk.input_token_logprobs, chunk.input_top_logprobs = req.input_logprobs()
    return chunk


def _finish(req: Req, reason: FinishReason) -> None:
    req.finish_reason = reason
    if req.sink is not None:
        req.sink.put(_chunk(req, "", [], reason))


def apply_forced_tokens(req: Req, tokens: list[int], retract: int, shown: list[int],
                        context_len: int, end: FinishReason | None = None) -> None:
    """Jump-forward: replace the last `retract` output tokens by `tokens` (the grammar's
    forced continuation, re-tokenized at the boundary). The consumer already has the
    replaced tokens; it gets `shown`, ids that render the same new text after them.
    `end`: the grammar is complete with this (the request finishes now)."""
    if retract:
        del req.output_ids[-retract:]
    req.output_ids.extend(tokens)
    reason = end
    text = ""
    if req.detok is not None:
        text, matched = req.detok.step(shown)
        if matched is not None:
            reason = FinishReason("stop", matched=matched)
    if reason is None and (len(req.output_ids) >= req.max_new_tokens or
                           req.seq_len >= context_len):
        reason = FinishReason("length")
    if reason is not None:
        text, reason = _flush(req, text, reason)
        req.finish_reason = reason
    if req.sink is not None:
        req.sink.put(_chunk(req, text, list(shown), reason))


def finish_request(req: Req, reason: FinishReason) -> None:
    """End a running request between steps (its grammar is complete, or cannot go on);
    a token of it still in flight is discarded when it arrives."""
    if req.finished:
        return
    text, reason = _flush(req, "", reason)
    req.finish_reason = reason
    if req.sink is not None:
        req.sink.put(_chunk(req, text, [], reason))


def _flush(req: Req, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
    """Text held back for a stop string that never came, released at the end."""
    if req.detok is not None and not isinstance(reason.matched, str):
        text += req.detok.flush()
        if req.detok.matched_stop is not None:  # completed by the flushed bytes
            reason = FinishReason("stop", matched=req.detok.matched_stop)
    return text, reason


def finish_aborted(req: Req) -> None:
    """Tell the consumer of an aborted request that it ended."""
    if req.sink is not None and req.finish_reason is not None:
        req.sink.put(_chunk(req, "", [], req.finish_reason))


def _add_prompt_logprobs(req: Req, out: StepOutput, first_pos: int, count: int,
                         start: int) -> None:
    values = out.prompt_logprobs[start:start + count]
    targets = req.prompt_ids[first_pos:first_pos + count]
    req.prompt_logprobs.extend(zip(values, targets))
    if req.top_logprobs_num and out.prompt_top_ids is not None:
        n = req.top_logprobs_num
        for row in range(start, start + count):
            req.prompt_top_logprobs.append(
                list(zip(out.prompt_top_values[row][:n], out.prompt_top_ids[row][:n])))
