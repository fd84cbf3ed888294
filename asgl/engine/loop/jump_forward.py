"""Jump-forward decoding: append what the grammar forces instead of decoding it.

When a request's grammar admits exactly one continuation string (`{"name": "` at the
start of a JSON object, `",\\n    "house": "` between two fields), the scheduler calls
`JumpForward(req)` at a moment when no step uses the request: the string's tokens become
output tokens at once and the request continues as an extend over them, reusing its KV.

Re-tokenization at the boundary: the last few output tokens and the forced string are
decoded together and encoded again, because the model's last token may be the start of a
longer token of the joined text (`"` then forced `,\\n` is canonically `",` + `\\n`). Tokens
that change are replaced (matcher rolled back, KV released by the scheduler from the first
changed position); the model thus sees the tokenization it was trained on. Consumers of the
stream already received the replaced tokens, so they are sent ids that render exactly the
forced string after what they have (`shown`); the text is identical either way.

Every tokenization is checked by decoding it in context; a string that does not
round-trip, or forced tokens the matcher rejects, turn jump-forward off for the request.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from asgl.engine.loop.output_processor import apply_forced_tokens, fail_request
from asgl.engine.contracts.outputs import FinishReason
from asgl.engine.scheduler.req import Req

BOUNDARY_TOKENS = 4  # output tokens re-tokenized together with the forced string
CONTEXT_TOKENS = 4  # tokens before them that the decode checks keep as context
# Under overlap scheduling a jump costs the request one skipped step (its in-flight token
# lands first), which pays off from about three forced tokens on.
MIN_JUMP_CHARS_OVERLAP = 6


class JumpForward:
    def __init__(self, tokenizer: Any, backend: Any, context_len: int):
        self.backend = backend
        self.context_len = context_len
        self._decode, self._encode = _codec(tokenizer)

    def __call__(self, req: Req) -> Optional[int]:
        """Append `req`'s forced continuation. Returns how many leading tokens of its
        fill_ids are unchanged (KV past them must be recomputed), or None if nothing
        changed. If the jump fails (its grammar or tokenizer raises), `req` alone ends with
        the error and only the KV of its unchanged tokens is kept."""
        before = list(req.output_ids)
        try:
            return self._jump(req)
        except Exception as exc:  # noqa: BLE001 - this request's fault only
            fail_request(req, f"this request failed: {type(exc).__name__}: {exc}"[:500], exc)
            return len(req.prompt_ids) + _common_prefix(before, req.output_ids)

    def _jump(self, req: Req) -> Optional[int]:
        g = req.grammar
        g.jump_pending = False
        forced = g.jump_string()
        plan = self._plan(req, forced) if forced else None
        if plan is None:
            return None
        retract, tokens, shown = plan
        old_tail = req.output_ids[len(req.output_ids) - retract:]
        g.rollback(retract)
        if not g.accept_forced(tokens):
            g.min_jump = 0
            g.accept_forced(old_tail)  # back to where it was
            g.jump_pending = False
            return None
        keep = req.seq_len - retract
        end = FinishReason("stop") if self.backend.must_stop(g) else None
        apply_forced_tokens(req, tokens, retract, shown, self.context_len, end)
        return keep

    def _plan(self, req: Req, forced: str) -> Optional[tuple[int, list[int], list[int]]]:
        """(tokens to retract, tokens to append, ids the consumer gets), or None."""
        out = req.output_ids
        room = min(req.max_new_tokens - len(out), self.context_len - 1 - req.seq_len)
        if room <= 0:
            return None
        k = min(BOUNDARY_TOKENS, len(out))
        fill = req.fill_ids
        tail = out[len(out) - k:]
        ctx = fill[max(0, len(fill) - k - CONTEXT_TOKENS):len(fill) - k]
        before = self._decode(ctx + tail)
        plain = self._encode(forced)
        if not plain or self._decode(ctx + tail + plain) != before + forced:
            self._disable(req)
            return None
        plan = (0, plain, plain)
        tail_text = self._decode(tail) if k else ""
        if k and "\ufffd" not in tail_text:
            canon = self._encode(tail_text + forced)
            common = _common_prefix(tail, canon)
            if canon[common:] and self._decode(ctx + tail[:common] + canon[common:]) \
                    == before + forced:
                plan = (k - common, canon[common:], plain if common < k else canon[common:])
        retract, tokens, shown = plan
        if len(tokens) - retract > room:
            if retract:  # too long to replace cleanly: append what fits
                retract, tokens, shown = 0, plain, plain
            tokens = shown = tokens[:room]
        return retract, tokens, shown

    @staticmethod
    def _disable(req: Req) -> None:
        req.grammar.min_jump = 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _codec(tokenizer: Any) -> tuple[Callable[[list[int]], str], Callable[[str], list[int]]]:
    """Faithful decode (special tokens kept, no cleanup) and encode without added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return (lambda ids: backend.decode(ids, skip_special_tokens=False),
                lambda text: backend.encode(text, add_special_tokens=False).ids)
    return (lambda ids: tokenizer.decode(ids, skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False),
            lambda text: tokenizer.encode(text, add_special_tokens=False))
