"""Synthetic datasets: generated images written as the WebDataset shards `ganforge shards` writes.

    ganforge sample models:/biggan@champion --n 100000 --to s3://ganforge/synthetic/biggan --truncation 0.7

Sample i (tar key i) comes from seed ``seed + i`` alone: its latent is ``latents(1, Generator().manual_seed(seed + i),
truncation)`` and its label i mod the class count (or the one ``--class``). Its JSON (seed, class, truncation, model
version) is therefore all it takes to regenerate it, e.g. as one row of the registered model's ``predict``. Shard k
holds samples [k·S, min((k+1)·S, n)) and is generated in batches counted from its own start, so any shard
regenerates alone, byte for byte.

Resume: every tar carries S3 metadata: its sha256, sample count, its index's sha256 and the export's fingerprint (the
sha256 of everything that decides its bytes: weights, architecture, seed, truncation, labels, class names, image
format, shard size; not ``n``, so a larger ``--n`` extends an export). A run HEADs the prefix's shards and generates
only those missing or not matching. An index goes up before its tar, so a tar in place means its index is too.
``manifest.json`` (:class:`~orchestrator.data.manifest.Manifest` with a ``synthetic`` block) goes last: a prefix with
one is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from orchestrator.data.images import encode
from orchestrator.data.manifest import MANIFEST, Manifest, ManifestError, ShardEntry
from orchestrator.data.s3 import DataError, check_prefix, describe_error, find_manifest
from orchestrator.data.writer import ShardOutput, ShardWriter, progress_bar, sample_files
from orchestrator.env import Env, split_s3_uri
from orchestrator.hashing import sha256_json
from orchestrator.sample import load_generator
from orchestrator.tracking.images import grid_labels, to_uint8

logger = logging.getLogger(__name__)

FORMATS = ("png", "jpg")
BATCH = 64  # images per generator forward; fixed, because float rounding (hence the shard bytes) depends on it
_SHARD_OBJECT = re.compile(r"train-\d{6}\.(tar|idx)")
# What makes two exports "the same dataset" in a refusal message (the fingerprint covers these and more).
_IDENTITY_KEYS = ("resolved", "weights_sha256", "seed", "truncation", "class", "image_ext", "samples_per_shard")


class ExportError(DataError):
    """A target prefix or request the export refuses; the message is one line naming the way out."""


# ---------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ShardPlan:
    """Shard ``index`` holds samples (and seeds, offset by the base seed) ``start`` … ``stop - 1``."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"train-{self.index:06d}.tar"

    @property
    def index_name(self) -> str:
        return f"train-{self.index:06d}.idx"

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Remote:
    """What a HEAD says about one object under the prefix."""

    size: int
    metadata: dict[str, str] = field(default_factory=dict)


def shard_plan(n: int, per_shard: int) -> list[ShardPlan]:
    """The fixed split of samples 0 … n-1 into shards of ``per_shard`` (the last one shorter)."""
    if n < 1 or per_shard < 1:
        raise ValueError(f"n={n} and per_shard={per_shard} must both be ≥ 1")
    return [ShardPlan(k, a, min(a + per_shard, n)) for k, a in enumerate(range(0, n, per_shard))]


def labels_for(start: int, stop: int, c_dim: int, class_: int | None) -> list[int]:
    """Labels of samples start … stop-1: the one ``class_``, else i mod ``c_dim`` (balanced over every full cycle,
    whatever n); 0 for an unconditional model (the shard format needs a label)."""
    if not c_dim:
        return [0] * (stop - start)
    return [class_] * (stop - start) if class_ is not None else [i % c_dim for i in range(start, stop)]


def fingerprint(identity: dict) -> str:
    """The export's name: the sha256 of everything that decides its bytes."""
    return sha256_json(identity)


def shard_metadata(fp: str, count: int) -> dict[str, str]:
    """S3 user metadata of a tar (``finish_shard`` adds its sha256 and its index's)."""
    return {"ganforge-export": fp, "count": str(count)}


def split_done(plan: list[ShardPlan], fp: str, remote: dict[str, Remote]) -> tuple[list[ShardPlan], list[ShardEntry]]:
    """(shards still to write, manifest entries of those already in place): a shard is in place when its tar has
    this export's fingerprint and the planned count, and its index is the one the tar recorded."""
    todo, done = [], []
    for shard in plan:
        tar, idx = remote.get(shard.name), remote.get(shard.index_name)
        meta = tar.metadata if tar else {}
        ok = (
            tar is not None
            and idx is not None
            and meta.get("ganforge-export") == fp
            and meta.get("count") == str(shard.count)
            and len(meta.get("sha256", "")) == 64
            and meta.get("index-sha256") == idx.metadata.get("sha256")
        )
        if ok:
            done.append(ShardEntry(shard.name, shard.index_name, shard.count, tar.size, meta["sha256"]))
        else:
            todo.append(shard)
    return todo, done


def foreign_shards(remote: dict[str, Remote], fp: str) -> list[str]:
    """Tars under the prefix that another export (or `ganforge shards`) wrote."""
    return sorted(k for k, r in remote.items() if k.endswith(".tar") and r.metadata.get("ganforge-export") != fp)


def check_target(old: Manifest | None, synthetic: dict, uri: str, overwrite: bool) -> None:
    """Refuse (one line) to write into a prefix whose complete dataset is not this export, or this export with more
    samples than asked (the extra shards would be dropped), unless ``overwrite``."""
    if old is None or overwrite:
        return
    way_out = "pass --overwrite to replace it or choose another --to"
    prev = old.synthetic
    if not isinstance(prev, dict):
        raise ExportError(
            f"{uri} already holds dataset {old.name!r} ({old.num_samples} samples), not a synthetic export; {way_out}"
        )
    if prev.get("fingerprint") != synthetic["fingerprint"]:
        diff = [
            f"{k} {_short(prev.get(k))} there, {_short(synthetic.get(k))} asked"
            for k in _IDENTITY_KEYS
            if prev.get(k) != synthetic.get(k)
        ] or ["class names or architecture differ"]
        raise ExportError(f"{uri} already holds another synthetic export ({'; '.join(diff)}); {way_out}")
    if int(prev.get("n", 0)) > synthetic["n"]:
        raise ExportError(
            f"{uri} already holds {prev['n']} samples of this export; --n {synthetic['n']} would drop "
            f"some: pass --overwrite to shrink it or use --n {prev['n']}"
        )


def _short(v):
    return f"{v[:12]}…" if isinstance(v, str) and len(v) == 64 else repr(v)


def generate(gen, start: int, stop: int, *, seed: int, truncation: float | None, class_: int | None):
    """(images N×C×H×W in [-1, 1], labels) of samples start … stop-1: sample i from seed ``seed + i`` alone."""
    labels = labels_for(start, stop, gen.c_dim, class_)
    z = torch.cat([gen.latents(1, torch.Generator().manual_seed(seed + i), truncation) for i in range(start, stop)])
    return gen.sample(z, torch.tensor(labels) if gen.c_dim else None, truncation), labels


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, raw bytes): names the weights however they were loaded."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------- result
@dataclass
class ExportResult:
    uri: str
    manifest: Manifest | None  # None when stopped early by ``max_new_shards`` (the prefix is then incomplete)
    written: list[str]  # tars generated and uploaded by this run
    reused: list[str]  # tars already in place from an earlier run
    deleted: list[str] = field(default_factory=list)  # stale objects removed under --overwrite


@dataclass(frozen=True)
class ExportSpec:
    """What decides an export's bytes and what its manifest says about them."""

    gen: object  # orchestrator.generator.Generator
    name: str  # the dataset's
    seed: int
    truncation: float | None
    class_: int | None
    image_ext: str
    channels: int
    resolution: int
    classes: list[str]
    synthetic: dict  # the manifest's block; its "fingerprint" names the bytes
    meta: dict  # what every sample's JSON records besides its label and seed

    @property
    def fingerprint(self) -> str:
        return self.synthetic["fingerprint"]


# ---------------------------------------------------------------------------------------------------------- export
def export_synthetic(
    source: str,
    to: str,
    *,
    n: int,
    seed: int = 0,
    truncation: float | None = None,
    class_: int | None = None,
    samples_per_shard: int = 5000,
    image_format: str = "png",
    overwrite: bool = False,
    device: str = "cpu",
    workers: int = os.cpu_count() or 1,
    max_new_shards: int | None = None,
    progress: bool = True,
    env: Env | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Generate ``n`` images from ``source`` (anything ``ganforge sample`` accepts) into WebDataset shards under
    ``to``; shards already in place from an earlier run of the same export are kept.

    ``image_format`` png (lossless, default) or jpg (JPEG q95, as `ganforge shards` writes photos).
    ``max_new_shards`` stops after writing that many shards, without a manifest: a time-boxed slice of a long
    export that the next run continues.
    """
    image_format = {"jpeg": "jpg"}.get(image_format, image_format)
    _check_arguments(to, n, samples_per_shard, seed, image_format, truncation, device)
    env = env or Env.from_environ()
    t0 = time.monotonic()
    spec = _describe(load_generator(source, device), env, n, seed, truncation, class_, image_format, samples_per_shard)
    output = ShardOutput(to, env)
    old = _old_manifest(output, spec, overwrite)
    remote = _remote_objects(output, env)
    foreign = foreign_shards(remote, spec.fingerprint)
    mine = old is not None and (old.synthetic or {}).get("fingerprint") == spec.fingerprint
    if foreign and not (overwrite or mine):
        raise ExportError(
            f"{to} holds {len(foreign)} shard(s) another export or dataset wrote (e.g. "
            f"{foreign[0]}) and no manifest of this export; pass --overwrite to replace them or choose "
            "another --to"
        )
    plan = shard_plan(n, samples_per_shard)
    todo, done = split_done(plan, spec.fingerprint, remote)
    limit = len(todo) if max_new_shards is None else max(0, min(max_new_shards, len(todo)))
    if limit and old is not None:
        # Shards are about to change under the old manifest: drop it first, so no reader trusts a set in flux.
        _delete(output, env, [MANIFEST])
    written = _write(spec, output, todo[:limit], done, n, workers, progress)
    result = ExportResult(to, None, sorted(e.name for e in written), sorted(e.name for e in done))
    if limit < len(todo):
        log(f"{to}: stopped after {limit} new shards ({len(todo) - limit} to go); run again to continue")
        return result
    in_place = None if limit else old  # a run that writes shards deleted the old manifest first
    result.manifest = manifest = _put_manifest(output, spec, in_place, n, done + written)
    if overwrite:  # only now, with the new manifest in place, are the old dataset's leftovers unreferenced
        keep = {s.name for s in manifest.shards} | {s.index for s in manifest.shards}
        result.deleted = sorted(k for k in remote if k not in keep)
        _delete(output, env, result.deleted)
    log(
        f"{to}: {n} samples in {len(plan)} shards from {spec.synthetic['resolved']} in "
        f"{time.monotonic() - t0:.1f} s ({len(written)} written, {len(done)} already there)"
    )
    return result


def _put_manifest(output: ShardOutput, spec: ExportSpec, old: Manifest | None, n: int, shards: list) -> Manifest:
    """The complete export's manifest, uploaded last; when it says what the one still in place (``old``) does, that
    one (and its date) stays as it is."""
    manifest = Manifest.create(
        name=spec.name,
        resolution=spec.resolution,
        channels=spec.channels,
        classes=spec.classes,
        num_samples=n,
        image_ext=spec.image_ext,
        shards=shards,
        synthetic=spec.synthetic,
    )
    if old is not None and old.hash == manifest.hash:
        return old
    output.put_manifest(manifest)
    return manifest


def _check_arguments(to: str, n: int, per_shard: int, seed: int, image_format: str, truncation, device: str) -> None:
    """Refuse bad arguments (one line each) before any model or S3 work."""
    if not to.startswith("s3://"):
        raise ValueError(f"--to {to!r} is not an S3 prefix; expected s3://<bucket>/<prefix>")
    split_s3_uri(to)
    if n < 1:
        raise ValueError(f"--n {n} not supported; valid: ≥ 1")
    if per_shard < 1:
        raise ValueError(f"--shard-size {per_shard} not supported; valid: ≥ 1 samples per shard")
    if seed < 0:
        raise ValueError(f"--seed {seed} not supported; valid: ≥ 0")
    if image_format not in FORMATS:
        raise ValueError(f"--format {image_format!r} not supported; valid: {', '.join(FORMATS)}")
    if truncation is not None and not math.isfinite(truncation):
        raise ValueError(f"--truncation {truncation} not supported; valid: a finite number")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked but CUDA is not available here; valid: cpu")


def _describe(loaded, env: Env, n: int, seed: int, truncation, class_, image_ext: str, per_shard: int) -> ExportSpec:
    """The export's identity (fingerprinted) and its manifest block, from the loaded model and the arguments."""
    gen = loaded.generator
    grid_labels(1, gen.c_dim, 1, class_)  # the class checks and their messages
    probe = generate(gen, 0, 1, seed=seed, truncation=truncation, class_=class_)[0]
    classes = _class_names(loaded, env)
    identity = {
        "model_name": gen.model_name,
        "config": gen.model_config()["config"],
        "weights_sha256": weights_sha256(gen.G_ema),
        "seed": seed,
        "truncation": truncation,
        "class": class_,
        "classes": classes,
        "image_ext": image_ext,
        "samples_per_shard": per_shard,
    }
    synthetic = {
        "model": loaded.uri,
        "resolved": loaded.resolved,
        "version": loaded.version,
        "run_id": loaded.run_id,
        "model_name": gen.model_name,
        "weights_sha256": identity["weights_sha256"],
        "seed": seed,
        "truncation": truncation,
        "class": class_,
        "labels": "none" if not gen.c_dim else ("fixed" if class_ is not None else "balanced"),
        "image_ext": image_ext,
        "samples_per_shard": per_shard,
        "n": n,
        "fingerprint": fingerprint(json.loads(json.dumps(identity, default=str))),
        "training_dataset": loaded.dataset,
    }
    meta = {"source": loaded.resolved, "version": loaded.version, "truncation": truncation}
    name = f"{loaded.name}-synthetic"
    channels, resolution = int(probe.shape[1]), int(probe.shape[-1])
    return ExportSpec(gen, name, seed, truncation, class_, image_ext, channels, resolution, classes, synthetic, meta)


def _write(
    spec: ExportSpec, output: ShardOutput, shards: list[ShardPlan], done: list, n: int, workers: int, progress: bool
) -> list[ShardEntry]:
    """Generate and upload ``shards`` (one upload thread: at most a few finished shards wait on local disk)."""
    with (
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="gf-encode") as pool,
        progress_bar(disable=not progress) as bar,
    ):
        task = bar.add_task(f"sampling {spec.synthetic['resolved']}", total=n, info="")
        bar.update(task, advance=sum(e.count for e in done), info=f"{len(done)} shards already there")

        def report() -> None:
            bar.update(task, info=f"{len(done)} shards already there, {len(writer.entries)} written")

        with ShardWriter(output, uploads=1, on_done=report) as writer:
            for shard in shards:
                builder = writer.new(shard.name)
                for a in range(shard.start, shard.stop, BATCH):
                    b = min(a + BATCH, shard.stop)
                    _add_batch(spec, builder, pool, a, b)
                    bar.advance(task, b - a)
                writer.finish(builder, shard_metadata(spec.fingerprint, shard.count))
    return writer.entries


def _add_batch(spec: ExportSpec, builder, pool: ThreadPoolExecutor, a: int, b: int) -> None:
    """Samples a … b-1 generated, encoded on ``pool`` and added to ``builder``."""
    images, labels = generate(spec.gen, a, b, seed=spec.seed, truncation=spec.truncation, class_=spec.class_)

    def encode_one(arr) -> bytes:
        return encode(Image.fromarray(arr[..., 0] if spec.channels == 1 else arr), spec.image_ext)

    for i, (label, data) in enumerate(zip(labels, pool.map(encode_one, to_uint8(images)), strict=True)):
        meta = {**spec.meta, "label": label, "class": spec.classes[label], "seed": spec.seed + a + i}
        builder.add(f"{a + i:08d}", sample_files(spec.image_ext, data, label, meta))


# ---------------------------------------------------------------------------------------------------------- helpers
def _class_names(loaded, env: Env) -> list[str]:
    """The training dataset's class names when its manifest is readable and matches the model, so synthetic labels
    line up with the real data they may be mixed with; else the label numbers."""
    c_dim = loaded.generator.c_dim
    names: list[str] = []
    if loaded.dataset.startswith("s3://"):
        try:
            names = list(check_prefix(loaded.dataset, env).classes)
        except (DataError, BotoCoreError, OSError) as e:
            logger.info("class names of %s unavailable (%s); using label numbers", loaded.dataset, e)
    if c_dim:
        return names if len(names) == c_dim else [str(i) for i in range(c_dim)]
    return names if len(names) == 1 else ["generated"]


def _old_manifest(output: ShardOutput, spec: ExportSpec, overwrite: bool) -> Manifest | None:
    """The manifest already under the prefix (None: none), once :func:`check_target` allows writing there. One that
    cannot be read is replaced only under ``overwrite``."""
    try:
        old = find_manifest(output.bucket, output.prefix, output.env)
    except ManifestError as e:
        if not overwrite:
            raise ExportError(
                f"{output.out} holds a manifest.json that is not a ganforge manifest ({e}); pass "
                "--overwrite to replace it or choose another --to"
            ) from None
        return None
    check_target(old, spec.synthetic, output.out, overwrite)
    return old


def _remote_objects(output: ShardOutput, env: Env) -> dict[str, Remote]:
    """Size and metadata of every shard tar/index directly under the prefix."""
    s3 = output.client
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=output.bucket, Prefix=output.prefix, Delimiter="/")
        names = [o["Key"][len(output.prefix) :] for p in pages for o in p.get("Contents", [])]
    except ClientError as e:
        raise DataError(describe_error(e, env, f"s3://{output.bucket}/{output.prefix}")) from None
    names = [k for k in names if _SHARD_OBJECT.fullmatch(k)]

    def head(name: str) -> tuple[str, Remote | None]:
        try:
            h = s3.head_object(Bucket=output.bucket, Key=output.prefix + name)
        except ClientError:  # gone since the listing
            return name, None
        return name, Remote(int(h["ContentLength"]), dict(h.get("Metadata", {})))

    with ThreadPoolExecutor(8) as pool:
        return {k: r for k, r in pool.map(head, names) if r is not None}


def _delete(output: ShardOutput, env: Env, names: list[str]) -> None:
    for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": output.prefix + k} for k in names[i : i + 1000]]
        try:
            out = output.client.delete_objects(Bucket=output.bucket, Delete={"Objects": batch, "Quiet": True})
        except ClientError as e:
            raise DataError(describe_error(e, env, f"s3://{output.bucket}/{output.prefix}")) from None
        if out.get("Errors"):
            err = out["Errors"][0]
            raise DataError(f"cannot delete s3://{output.bucket}/{err['Key']}: {err.get('Code')} {err.get('Message')}")
