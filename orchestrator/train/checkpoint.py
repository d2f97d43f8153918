"""Full training state on disk: one directory per checkpoint, merged across ranks by Ray Train.

    state.pt      rank 0: recipe state (G, D, G_ema, optimisers, scaler, counters, ADA p), step, resolved config
    rank-<r>.pt   every rank: its RNG states and data-loader position (and the shards it reads)
    meta.json     rank 0, written last: step, kimg, git sha, sha256 of every file above

Files are written under a temporary name and renamed, so a reader never sees half a file; a checkpoint whose
checksums do not match is refused with a clear error instead of being half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE = "state.pt"
META = "meta.json"


class CheckpointError(RuntimeError):
    pass


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This worker's RNG states. On a GPU only its own device's generator: Ray Train shows every worker of a node all
    of the node's GPUs, and a state per visible GPU would be restored into other devices' generators (or fail with
    an IndexError) when the worker comes back on a node with fewer GPUs, or as another local rank."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, list | tuple):  # checkpoints before one-device states: one state per then-visible GPU
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is None:
            return
    torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


def save(directory: str | Path, *, rank: int, rank_state: dict[str, Any], shared: dict[str, Any] | None,
         meta: dict[str, Any] | None) -> None:  # fmt: skip
    """Write this rank's part; rank 0 also passes ``shared`` (the model state) and ``meta``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_save(rank_state, d / rank_file(rank))
    if shared is not None:
        _atomic_save(shared, d / STATE)
        files = {STATE: sha256_file(d / STATE)}
        meta = {**(meta or {}), "files": files}
        tmp = d / f".{META}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, d / META)


def load_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory} has no {META}: it was not completely written")
    return json.loads(path.read_text())


def load_shared(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    d = Path(directory)
    meta = load_meta(d)
    expected = meta.get("files", {}).get(STATE)
    if not (d / STATE).exists():
        raise CheckpointError(f"checkpoint {d} is missing {STATE}")
    actual = sha256_file(d / STATE)
    if expected != actual:
        raise CheckpointError(f"checkpoint {d}/{STATE} is corrupt: sha256 {actual[:12]} != recorded {expected}")
    return torch.load(d / STATE, map_location=map_location, weights_only=False)


def load_rank(directory: str | Path, rank: int) -> dict[str, Any] | None:
    """This rank's state, or None when the checkpoint came from a run with fewer ranks."""
    path = Path(directory) / rank_file(rank)
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def restore(checkpoint: Any, rank: int, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Any]:
    """(shared state, this rank's state or None) of a Ray Train checkpoint.

    Every rank downloads into its own directory. Ray's ``as_directory`` shares one download directory between the
    processes of a node, and a rank that enters after another's download finished downloads again over the files
    the first is still reading (seen in CI as a torch.load "file read failed" right after a matching checksum).
    """
    with tempfile.TemporaryDirectory(prefix=f"ganforge-restore-{rank}-") as d:
        checkpoint.to_directory(d)
        return load_shared(d, map_location=map_location), load_rank(d, rank)
