"""Models and tokenizers named as Hugging Face users name them: a local folder, a URL, or a Hub
id `org/name[@revision]`. A Hub id is resolved through huggingface_hub's own cache (HF_HOME,
HF_HUB_OFFLINE and HF_TOKEN honoured) to its snapshot folder, whose path names the commit:
`.../models--org--name/snapshots/<commit>`. The driver resolves every id once, before any
work; a node whose cache lacks that commit resolves it again (`local_snapshot`).
"""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")
# what scoring, training and tokenising read: configs, tokenizers, weights, shipped model code
PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.py"]
# what `miniplm plan` reads: configs and tokenizers, never weights
CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(name: str) -> bool:
    """`org/name[@revision]` that is not an existing local path (a local folder wins)."""
    return bool(HUB_ID.match(name)) and not os.path.exists(os.path.expanduser(name))


def resolve(name: str, patterns: list[str] = PATTERNS) -> str:
    """The local snapshot folder of a Hub id (its files matching `patterns` downloaded into the
    Hugging Face cache unless HF_HUB_OFFLINE is set); a ValueError naming the id and the reason
    when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    match = HUB_ID.match(name)
    try:
        return snapshot_download(match["repo"], revision=match["revision"], allow_patterns=patterns)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        reason = str(err).split("\n")[0]
        raise ValueError(f"{name}: no such local folder, and as a Hugging Face Hub id it cannot be "
                         f"resolved ({type(err).__name__}: {reason}). Check the spelling, HF_TOKEN for a "
                         "gated model, or download it first (`hf download ...`) when HF_HUB_OFFLINE is set")


def resolve_configs(name: str) -> str:
    """`resolve` for a look before any work: the snapshot folder with the model's configs and
    tokenizer files only (the weights stay where they are, downloaded by the run itself)."""
    return resolve(name, CONFIG_PATTERNS)


def offline() -> bool:
    """Whether huggingface_hub may not download (HF_HUB_OFFLINE, as it read it at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def describe(path: str) -> dict | None:
    """{"id", "commit"} of a Hub snapshot folder; None for any other path."""
    match = SNAPSHOT.search(path.replace(os.sep, "/"))
    return {"id": f"{match['org']}/{match['name']}", "commit": match["commit"]} if match else None


def local_snapshot(path: str) -> str:
    """`path` itself where it exists; a Hub snapshot folder that this node's cache lacks is
    resolved again here, by its commit (each node of a cluster has a cache of its own)."""
    hub = describe(path)
    if hub is None or os.path.exists(path):
        return path
    return resolve(f"{hub['id']}@{hub['commit']}")


def content_names(path: str, files: list[str]) -> list[str] | None:
    """For files of a Hub snapshot, the blobs they link to: the blob's name is the hash of its
    content (git's, or sha256 for large files), so a commit's fingerprint needs no reading.
    None where the files are not all such links."""
    if describe(path) is None:
        return None
    blobs = []
    for name in files:
        target = os.path.realpath(os.path.join(path, name))
        if not os.path.islink(os.path.join(path, name)) or os.path.basename(os.path.dirname(target)) != "blobs":
            return None
        blobs.append(f"{name}:{os.path.basename(target)}")
    return blobs
