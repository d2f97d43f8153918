"""Full training state on disk: one directory per checkpoint, merged across ranks by Ray Train.

    state.pt      rank 0: ``TrainState`` — recipe state (G, D, G_ema, optimisers, scaler, counters, ADA p), step,
                  resolved config, quality record, health monitor state
    rank-<r>.pt   every rank: ``RankState`` — its RNG states and data-loader position (and the shards it reads)
    meta.json     rank 0, written last: ``Meta`` — step, kimg, git sha, sha256 of every file above

Each file holds its dataclass as a plain dict (``to_dict``/``from_dict`` are the one writer and reader), so a
checkpoint opens with ``torch.load`` alone, without this package.

Files are written under a temporary name and renamed, so a reader never sees half a file; a checkpoint whose
checksums do not match is refused with a clear error instead of being half-loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.hashing import sha256_file

STATE = "state.pt"
META = "meta.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Quality:
    """The quality metric's record: last and best value (+inf until the first evaluation) and where the best
    checkpoint is."""

    last: float = math.inf
    best: float = math.inf
    best_checkpoint: str | None = None


@dataclass
class TrainState:
    """``state.pt``: everything rank 0 saves for the whole run."""

    recipe: dict[str, Any]
    step: int
    tick: int
    config: dict[str, Any] = field(default_factory=dict)
    quality: Quality = field(default_factory=Quality)
    health: dict[str, Any] | None = None  # HealthMonitor.state_dict(); absent in checkpoints from before the guard
    fire_drill_done: bool = False

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies every tensor of the recipe state
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "quality": dataclasses.asdict(self.quality)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            recipe=d["recipe"],
            step=int(d["step"]),
            tick=int(d["tick"]),
            config=d.get("config", {}),
            quality=Quality(**d.get("quality", {})),
            health=d.get("health"),
            fire_drill_done=bool(d.get("fire_drill_done", False)),
        )


@dataclass
class RankState:
    """``rank-<r>.pt``: what one rank needs to continue its own streams exactly."""

    rng: dict[str, Any]
    loader: dict[str, Any]
    shards: list[str] = field(default_factory=list)
    fingerprint: dict[str, str] = field(default_factory=dict)  # ddp.fingerprint: proves the replicas were equal
    node_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class Meta:
    """``meta.json``, written last: a checkpoint without it is incomplete."""

    step: int
    tick: int = 0
    kimg: float = 0.0
    world_size: int = 1
    git_sha: str = "unknown"
    manifest_hash: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name → sha256

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Meta:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


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


def save(
    directory: str | Path,
    *,
    rank: int,
    rank_state: RankState,
    train: TrainState | None = None,
    meta: Meta | None = None,
) -> None:
    """Write this rank's part; rank 0 also passes ``train`` (the run's state) and ``meta``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_save(rank_state.to_dict(), d / rank_file(rank))
    if train is not None:
        _atomic_save(train.to_dict(), d / STATE)
        meta = dataclasses.replace(
            meta or Meta(step=train.step, tick=train.tick), files={STATE: sha256_file(d / STATE)}
        )
        tmp = d / f".{META}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(meta), indent=2, default=str))
        os.replace(tmp, d / META)


def load_meta(directory: str | Path) -> Meta:
    path = Path(directory) / META
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory} has no {META}: it was not completely written")
    return Meta.from_dict(json.loads(path.read_text()))


def load_train_state(directory: str | Path, map_location: str | torch.device = "cpu") -> TrainState:
    d = Path(directory)
    expected = load_meta(d).files.get(STATE)
    if not (d / STATE).exists():
        raise CheckpointError(f"checkpoint {d} is missing {STATE}")
    actual = sha256_file(d / STATE)
    if expected != actual:
        raise CheckpointError(f"checkpoint {d}/{STATE} is corrupt: sha256 {actual[:12]} != recorded {expected}")
    return TrainState.from_dict(torch.load(d / STATE, map_location=map_location, weights_only=False))


def load_rank(directory: str | Path, rank: int) -> RankState | None:
    """This rank's state, or None when the checkpoint came from a run with fewer ranks."""
    path = Path(directory) / rank_file(rank)
    return RankState.from_dict(torch.load(path, map_location="cpu", weights_only=False)) if path.exists() else None


def restore(
    checkpoint: Any, rank: int, map_location: str | torch.device = "cpu"
) -> tuple[TrainState, RankState | None]:
    """(shared state, this rank's state or None) of a Ray Train checkpoint.

    Every rank downloads into its own directory. Ray's ``as_directory`` shares one download directory between the
    processes of a node, and a rank that enters after another's download finished downloads again over the files
    the first is still reading (seen in CI as a torch.load "file read failed" right after a matching checksum).
    """
    with tempfile.TemporaryDirectory(prefix=f"ganforge-restore-{rank}-") as d:
        checkpoint.to_directory(d)
        return load_train_state(d, map_location=map_location), load_rank(d, rank)


def copy_state(obj: Any, device: torch.device | str = "cpu") -> Any:
    """A deep copy of a nested state dict with every tensor copied to ``device``. Optimisers update their state in
    place, and loading a state dict on the same device may share its tensors, so a snapshot is copied both when
    taken and when restored. Module state dicts keep their ``_metadata`` (version info ``load_state_dict`` reads)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        kind = OrderedDict if isinstance(obj, OrderedDict) else dict
        out = kind((k, copy_state(v, device)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(copy_state(v, device) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """The state of the last checkpoint written while healthy, in CPU memory: what a rollback restores."""

    step: int
    tick: int
    recipe: dict[str, Any]
    quality: Quality

    @classmethod
    def take(cls, step: int, tick: int, recipe_state: dict[str, Any], quality: Quality) -> Snapshot:
        return cls(step, tick, copy_state(recipe_state), dataclasses.replace(quality))
