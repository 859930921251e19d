"""`--model ORG/NAME`: a Hugging Face Hub id resolved to a local snapshot directory, once, early.

    resolve_model("Qwen/Qwen2.5-VL-3B-Instruct")
        -> ~/.cache/huggingface/hub/models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/<commit>

| `model`                    | read from                                                            |
|----------------------------|----------------------------------------------------------------------|
| an existing directory      | that directory, as it is (the revision does not apply)               |
| a Hub id in the cache      | the cache's snapshot of the revision (refs/<branch or tag>, a commit)|
| a Hub id not in the cache  | a download into the cache of what epd reads, unless HF_HUB_OFFLINE   |
| anything else              | ModelNotFoundError: one line naming the local path, the id, the      |
|                            | revision, the cache directory, and offline or not                    |

The cache comes first, even online: a model that is there starts without the network. It is
the cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub), read from the environment at
each call rather than when huggingface_hub was imported. Every consumer (tokenizer, image
processor, config, weight loader, the instance processes) then gets the snapshot directory, so
all of them read the same commit even if the branch moves meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
# What epd reads from a checkpoint: config, generation config, tokenizer, processor configs and
# chat template (json, jinja), then the weights (safetensors, with their index: a json).
# Top level only: some repositories keep other formats or original weights in subfolders.
METADATA_PATTERNS = ("*.json", "*.jinja")
WEIGHT_PATTERNS = ("*.safetensors",)
IGNORE_PATTERNS = ("*/*",)
REQUIRED_FILES = ("config.json", "tokenizer.json")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of a boolean variable


class ModelNotFoundError(FileNotFoundError):
    """`model` is neither a local directory nor a Hub model found in the cache or downloaded.

    A FileNotFoundError, which `epd serve` reports in one line ("cannot start: ...")."""


@dataclass(frozen=True)
class HubLookup:
    """Where a Hub id is looked for: the environment at the time of the call."""

    repo_id: str
    revision: str
    cache_dir: Path
    offline: bool

    @classmethod
    def from_env(cls, repo_id: str, revision: str | None) -> HubLookup:
        return cls(repo_id, revision or DEFAULT_REVISION, hub_cache_dir(), hub_offline())

    def not_found(self, state: str, outcome: str) -> ModelNotFoundError:
        """One line: the local path checked, then what the cache held and what the Hub did."""
        return ModelNotFoundError(
            f"model {self.repo_id!r} not found: no local directory {os.path.abspath(self.repo_id)}, "
            f"and {state}; {outcome}"
        )

    def not_cached(self, snapshot: Path | None, missing: list[str]) -> str:
        where = f"the Hub cache {self.cache_dir} at revision {self.revision!r}"
        if snapshot is None:
            return f"not in {where}"
        return f"its snapshot in {where}, {snapshot}, lacks {_listed(missing)}"


def hub_cache_dir() -> Path:
    """huggingface_hub's cache: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        cache = os.path.join(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def resolve_model(model: str, revision: str | None = None, *, weights: bool = True) -> str:
    """The local directory to read `model` from (see the module docstring). `weights`: False
    with dummy weights, which then need not be in the cache nor be downloaded."""
    if os.path.isdir(model):
        return model
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelNotFoundError(
            f"model {model!r} not found: no local directory {os.path.abspath(model)}, "
            "and not a Hub id (ORG/NAME) to look up"
        ) from None
    lookup = HubLookup.from_env(model, revision)
    cached = _cached_snapshot(lookup)
    missing = _missing_files(cached, weights) if cached is not None else []
    if cached is not None and not missing:
        logger.info("model %s (revision %s): Hub cache snapshot %s", model, lookup.revision, cached)
        return str(cached)
    state = lookup.not_cached(cached, missing)
    if lookup.offline:
        raise lookup.not_found(state, "HF_HUB_OFFLINE is set, so nothing was downloaded")
    snapshot = _download(lookup, weights, state)
    missing = _missing_files(snapshot, weights)
    if missing:
        raise lookup.not_found(lookup.not_cached(snapshot, missing), "even after a download")
    return str(snapshot)


def _cached_snapshot(lookup: HubLookup) -> Path | None:
    try:
        path = huggingface_hub.snapshot_download(
            lookup.repo_id, revision=lookup.revision, cache_dir=lookup.cache_dir, local_files_only=True
        )
    except LocalEntryNotFoundError:  # also a snapshot that the cached file listing shows is partial
        return None
    return Path(path)


def _download(lookup: HubLookup, weights: bool, state: str) -> Path:
    patterns = [*METADATA_PATTERNS, *(WEIGHT_PATTERNS if weights else ())]
    logger.info("model %s: %s; downloading %s", lookup.repo_id, state, " ".join(patterns))
    try:
        path = huggingface_hub.snapshot_download(
            lookup.repo_id,
            revision=lookup.revision,
            cache_dir=lookup.cache_dir,
            allow_patterns=patterns,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except RevisionNotFoundError:
        raise lookup.not_found(state, f"the Hub has no revision {lookup.revision!r}") from None
    except RepositoryNotFoundError:  # gated and private repositories too, without a token
        raise lookup.not_found(
            state, "the Hub has no such model (or it is private or gated: set HF_TOKEN)"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:  # the network, the Hub, the disk
        raise lookup.not_found(state, f"the download failed ({_first_line(e)})") from None
    return Path(path)


def _missing_files(snapshot: Path, weights: bool) -> list[str]:
    """What epd needs that `snapshot` lacks (a link into blobs/ whose blob is gone counts as lacking)."""
    missing = [name for name in REQUIRED_FILES if not (snapshot / name).is_file()]
    return missing + _missing_weights(snapshot) if weights else missing


def _missing_weights(snapshot: Path) -> list[str]:
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [shard for shard in shards if not (snapshot / shard).is_file()]
    return [] if any(p.is_file() for p in snapshot.glob("*.safetensors")) else ["*.safetensors"]


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + f" and {len(names) - most} more" if len(names) > most else shown


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].removeprefix("Got: ") if lines else type(error).__name__
