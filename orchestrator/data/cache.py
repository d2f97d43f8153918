"""A node-local LRU cache of verified shards, so that later epochs read a local file instead of S3."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from orchestrator.data.manifest import ShardEntry


class ShardCache:
    """Local copies of verified shards under ``root``, least recently used evicted beyond ``max_bytes``.

    A shard enters the cache only after it streamed whole with the manifest's sha256, and is renamed into place, so
    a reader never sees a partial or unverified copy; several ranks on one node can share the folder.
    """

    def __init__(self, root: str, max_bytes: int):
        self.root, self.max_bytes = Path(root).expanduser(), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, entry: ShardEntry) -> Path:
        return self.root / f"{entry.sha256[:16]}-{entry.name}"  # content-addressed: a re-written dataset misses

    def open(self, entry: ShardEntry):
        p = self.path(entry)
        try:
            if p.stat().st_size != entry.bytes:
                return None
            os.utime(p)  # recently used
            return open(p, "rb")
        except OSError:
            return None

    def writer(self, entry: ShardEntry):
        if entry.bytes > self.max_bytes:
            return None
        with contextlib.suppress(OSError):
            return open(self.path(entry).with_suffix(f".partial-{os.getpid()}-{threading.get_ident()}"), "wb")
        return None

    def commit(self, entry: ShardEntry, f, ok: bool) -> None:
        f.close()
        tmp = Path(f.name)
        if not ok:
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, self.path(entry))
        files = sorted(self.root.glob("*.tar"), key=lambda q: q.stat().st_mtime)
        total = sum(q.stat().st_size for q in files)
        for q in files[:-1]:
            if total <= self.max_bytes:
                break
            total -= q.stat().st_size
            q.unlink(missing_ok=True)
