"""sha256 names for content: of a file (shards, checkpoints) and of canonical JSON (manifests, export identities)."""

from __future__ import annotations

import hashlib
import json
import os

_PIECE = 4 << 20  # bytes per read: few, large reads


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_PIECE):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces): equal content, equal hash, whatever the order.
    Values JSON cannot hold count by their ``str``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
