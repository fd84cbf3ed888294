"""`asgl.lang.global_config` (SGLang's `sgl.global_config`): the default backend and the
frontend's switches, as attributes of one object."""

from __future__ import annotations

from typing import Any, Optional


class GlobalConfig:
    def __init__(self) -> None:
        # What `fn.run()` uses without `backend=`; `set_default_backend` sets it.
        self.default_backend: Optional[Any] = None
        # 0: quiet; 2: print each program's text when it finishes (as SGLang)
        self.verbosity = 0
        # run_batch: find the prefix every program of the batch starts with (by tracing the
        # programs up to their first gen/select) and have the runtime cache it before the
        # batch runs, so it is prefilled once rather than by every program at once.
        self.enable_precache_with_tracing = True
        # forks.join("concate_and_append"): SGLang concatenates the branches' KV caches where
        # the backend can; asgl appends their text (the radix cache serves what it holds).
        self.enable_parallel_encoding = True
        # Kept for SGLang programs that set them; asgl's servers already skip special tokens.
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True

    def __repr__(self) -> str:
        return f"GlobalConfig({vars(self)})"


global_config = GlobalConfig()
