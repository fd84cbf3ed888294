"""Models from a hub: `--model-path ORG/NAME` downloaded into the user's cache on first use.

Hugging Face through `huggingface_hub.snapshot_download` (its cache under `HF_HOME`, its
token from `HF_TOKEN`, offline with `HF_HUB_OFFLINE=1`, the endpoint from `HF_ENDPOINT`, a
byte progress bar on stderr, and resumable: an interrupted file is continued with a Range
request on the next start); ModelScope instead when `SGLANG_USE_MODELSCOPE` or
`ASGL_USE_MODELSCOPE` is true (the optional `modelscope` package). Only what serving reads is
fetched: safetensors (or, when a repo has none, `pytorch_model*.bin`), the configs, the
tokenizer and chat-template files; for a GGUF repo, the one file `--gguf-file` names or
that the `ORG/NAME:QUANT` tag picks.

`download()` returns a local path that `loader._from_path` reads like any other; every
failure is a `ModelLoadError` whose message says what to do (a token, a revision, the
network).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

from asgl.engine.contracts.errors import ModelLoadError

logger = logging.getLogger(__name__)

# ORG/NAME with an optional :TAG (a GGUF quantization, as Ollama and llama.cpp name them)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?::(?P<tag>[\w.\-]+))?$")
_TRUE = ("1", "true", "yes", "on")

# What serving reads from a repo (loader.py): configs, tokenizer, chat template, pooling
# configs of embedding models. The weights patterns are added per call.
META_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                 "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                 "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    tag: Optional[str] = None        # ORG/NAME:Q4_K_M -> "Q4_K_M"
    gguf_file: Optional[str] = None  # --gguf-file


def parse_hub_id(path: str, gguf_file: Optional[str] = None) -> Optional[HubRef]:
    """The hub reference `path` names, or None when it is a local path or not an id.
    A path that exists locally is never a hub id."""
    if not path or os.path.exists(os.path.expanduser(path)) or path.startswith((".", "~", "/")):
        return None
    match = _HUB_ID.match(path)
    if match is None:
        return None
    return HubRef(match["repo"], match["tag"], gguf_file)


def use_modelscope() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("ASGL_USE_MODELSCOPE", "SGLANG_USE_MODELSCOPE"))


def download(ref: HubRef, revision: Optional[str] = None, config_only: bool = False) -> str:
    """Fetch `ref` at `revision` into the cache (or find it there) and return the local
    directory, or the .gguf file for a GGUF repo. `config_only`: configs and tokenizer, no
    weights (for --load-format dummy)."""
    fetch = _modelscope_snapshot if use_modelscope() else _hf_snapshot
    where = "ModelScope" if use_modelscope() else _hf_endpoint()
    shown = ref.repo_id + (f"@{revision}" if revision else "")
    if ref.gguf_file or ref.tag:
        patterns = [ref.gguf_file] if ref.gguf_file else _tag_patterns(ref.tag)
        logger.info("model %s: fetching %s from %s (cached after the first time)", shown,
                    ref.gguf_file or f"the {ref.tag} GGUF", where)
        local = fetch(ref.repo_id, revision, patterns)
        return _pick_gguf(local, ref)
    weights = [] if config_only else SAFETENSORS_PATTERNS
    logger.info("model %s: fetching %s from %s (cached after the first time)", shown,
                "config and tokenizer" if config_only else "weights, config and tokenizer",
                where)
    local = fetch(ref.repo_id, revision, META_PATTERNS + weights)
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise ModelLoadError(f"hub repo {shown}: has no config.json (a GGUF repo needs "
                             "--gguf-file F.gguf or ORG/NAME:QUANT)")
    if not config_only and not _has(local, ".safetensors"):
        # an older repo with PyTorch pickles only (loaded with weights_only=True)
        local = fetch(ref.repo_id, revision, META_PATTERNS + BIN_PATTERNS)
    return local


def _tag_patterns(tag: str) -> list[str]:
    # fnmatch is case-sensitive here; quantization names appear in both cases in file names
    return sorted({f"*{tag}*.gguf", f"*{tag.upper()}*.gguf", f"*{tag.lower()}*.gguf"})


def _has(directory: str, suffix: str) -> bool:
    return any(name.endswith(suffix) for _, _, names in os.walk(directory) for name in names)


def _pick_gguf(local: str, ref: HubRef) -> str:
    if ref.gguf_file:
        path = os.path.join(local, ref.gguf_file)
        if not os.path.isfile(path):
            raise ModelLoadError(f"hub repo {ref.repo_id}: no file {ref.gguf_file!r} (--gguf-file)")
        return path
    found = sorted(os.path.relpath(os.path.join(d, n), local) for d, _, names in os.walk(local)
                   for n in names if n.endswith(".gguf") and ref.tag.lower() in n.lower())
    if len(found) == 1:
        return os.path.join(local, found[0])
    if not found:
        raise ModelLoadError(f"hub repo {ref.repo_id}: no .gguf file matches the tag "
                             f"{ref.tag!r}; name one with --gguf-file")
    raise ModelLoadError(f"hub repo {ref.repo_id}: several .gguf files match {ref.tag!r} "
                         f"({', '.join(found)}); name one with --gguf-file")


# --------------------------------------------------------------------------- Hugging Face
def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hf_snapshot(repo_id: str, revision: Optional[str], patterns: list[str]) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    shown = repo_id + (f"@{revision}" if revision else "")
    # read now, not at huggingface_hub's import (transformers imports it first)
    endpoint = _hf_endpoint()
    token_given = bool(os.environ.get("HF_TOKEN") or _stored_token())
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                 endpoint=endpoint)
    except hub_errors.GatedRepoError:
        raise ModelLoadError(
            f"hub repo {repo_id} is gated: accept its terms on the model page, then "
            + ("check that HF_TOKEN's account has been granted access" if token_given else
               "set HF_TOKEN to a token of that account (none is set)")) from None
    except hub_errors.RevisionNotFoundError:
        raise ModelLoadError(f"--revision {revision!r}: no such branch, tag or commit in hub "
                             f"repo {repo_id}") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelLoadError(
            f"hub repo {repo_id}: not found on {endpoint}"
            + ("" if token_given else " (a private repo needs HF_TOKEN)")
            + "; a local path must exist") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled,
            hub_errors.IncompleteSnapshotError) as exc:
        offline = constants.is_offline_mode()
        raise ModelLoadError(
            f"hub repo {shown}: not in the cache ({constants.HF_HUB_CACHE}) and "
            + ("HF_HUB_OFFLINE=1 forbids downloading" if offline else
               f"{endpoint} cannot be reached ({_first_line(exc)})")
            + "; download it once with network access, or pass a local path") from None
    except hub_errors.EntryNotFoundError as exc:  # LocalEntryNotFoundError's base: after it
        raise ModelLoadError(f"hub repo {shown}: a file is missing: {_first_line(exc)}") from None
    except hub_errors.HfHubHTTPError as exc:
        raise ModelLoadError(f"hub repo {shown}: {_first_line(exc)}") from None
    except OSError as exc:  # disk full, permissions on HF_HOME
        raise ModelLoadError(f"hub repo {shown}: cannot write the cache "
                             f"({constants.HF_HUB_CACHE}): {exc}") from None


def _stored_token() -> Optional[str]:
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # noqa: BLE001 - an unreadable token file means no token
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- ModelScope
def _modelscope_snapshot(repo_id: str, revision: Optional[str], patterns: list[str]) -> str:
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ModelLoadError(
            "SGLANG_USE_MODELSCOPE/ASGL_USE_MODELSCOPE is set but the modelscope package is "
            "not installed: pip install 'asgl[modelscope]' (or unset the variable to use "
            "the Hugging Face hub)") from None
    shown = repo_id + (f"@{revision}" if revision else "")
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - modelscope raises many unrelated types
        raise ModelLoadError(f"ModelScope repo {shown}: {_first_line(exc)}") from None
