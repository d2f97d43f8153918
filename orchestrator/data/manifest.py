"""``manifest.json``: what a shard prefix holds, written last so that a prefix with one is complete.

:class:`Manifest` is the one type for it, with one reader (:meth:`Manifest.from_json`) and one writer
(:meth:`Manifest.to_json`); :func:`orchestrator.data.s3.check_prefix` fetches it from S3.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.data.errors import DataError
from orchestrator.hashing import sha256_json

FORMAT = 1
MANIFEST = "manifest.json"


class ManifestError(DataError):
    """A ``manifest.json`` is there but is not one this version reads (the message is one line)."""


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard: its object name, its DALI index's name, its sample count, size and sha256."""

    name: str
    index: str
    count: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "index": self.index, "count": self.count, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    name: str
    resolution: int
    channels: int  # of the stored images (1: grey)
    classes: tuple[str, ...]
    num_samples: int
    image_ext: str
    shards: tuple[ShardEntry, ...]
    synthetic: dict | None = None  # a synthetic export's block (orchestrator.export)
    created: str = ""

    @classmethod
    def create(cls, *, classes: Iterable[str], shards: Iterable[ShardEntry], **fields) -> Manifest:
        """A new manifest, dated now, its shards in name order."""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ordered = tuple(sorted(shards, key=lambda s: s.name))
        return cls(classes=tuple(classes), shards=ordered, created=created, **fields)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON without ``created``: it names the data, not when it was written."""
        return sha256_json({k: v for k, v in self.to_json().items() if k != "created"})

    def to_json(self) -> dict:
        extra = {"synthetic": self.synthetic} if self.synthetic is not None else {}
        return {
            "format": FORMAT,
            "name": self.name,
            "resolution": self.resolution,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "num_samples": self.num_samples,
            "image_ext": self.image_ext,
            "shards": [s.to_json() for s in self.shards],
            **extra,
            "created": self.created,
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1).encode()

    @classmethod
    def from_json(cls, body: bytes | str, where: str) -> Manifest:
        """Parse ``manifest.json`` read from ``where``, or a one-line :class:`ManifestError` saying why not."""
        try:
            data = json.loads(body)
        except ValueError:
            raise ManifestError(f"{where} is not valid JSON; rewrite the shards") from None
        bad = ManifestError(f"{where} is not a ganforge manifest (format 1 with shards); rewrite the shards")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not data.get("shards"):
            raise bad
        try:
            shards = tuple(
                ShardEntry(s["name"], s.get("index") or "", int(s["count"]), int(s["bytes"]), s["sha256"])
                for s in data["shards"]
            )
            return cls(
                name=str(data.get("name", "")),
                resolution=int(data["resolution"]),
                channels=int(data.get("channels", 3)),
                classes=tuple(str(c) for c in data.get("classes", [])),
                num_samples=int(data["num_samples"]),
                image_ext=str(data.get("image_ext", "")),
                shards=shards,
                synthetic=data.get("synthetic"),
                created=str(data.get("created", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise bad from None
