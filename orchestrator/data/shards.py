"""Write a dataset as WebDataset tar shards (+ DALI indexes + manifest.json) to S3 or a local folder.

Layout under the output prefix::

    train-000000.tar   samples <key>.png|jpg, <key>.cls (ASCII int), <key>.json ({"label", "class", "source"})
    train-000000.idx   DALI's index for fn.readers.webdataset (written by DALI's own wds2idx)
    manifest.json      written last: a prefix with a manifest is complete

Tars are byte-for-byte deterministic (fixed order, mtime, owner), so a re-run produces the same sha256 per shard and
skips the upload of every shard already in place: an interrupted write resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.data import fashion_mnist
from orchestrator.data.s3 import DataError, ObjectStream, client, describe_error
from orchestrator.env import Env, split_s3_uri

log = logging.getLogger(__name__)

FORMAT = 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # what a sample's image may be called in a source WebDataset
FOLDER_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
JPEG_QUALITY = 95
VALID_SOURCES = "fashion-mnist, a folder path, or an s3:// WebDataset prefix"
_MB = 1 << 20


@dataclass
class Sample:
    image: bytes
    label: int
    source: str


# ---------------------------------------------------------------------------------------------------------- images
def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """NVlabs dataset_tool's ``center-crop``: the largest centred square, LANCZOS-resized (antialiased)."""
    w, h = img.size
    crop = min(w, h)
    box = ((w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2)
    if img.size == (resolution, resolution):
        return img
    # crop first, as dataset_tool does: resizing with box= would let LANCZOS's support pull in pixels outside it
    return img.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)


def encode(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """Where samples come from: ``tasks`` (cheap, in order) each turned into a :class:`Sample` by ``load``
    (the expensive decode/resize/encode, run in a thread pool — PIL releases the GIL while coding)."""

    name: str
    classes: list[str]
    channels: int
    resolution: int
    image_ext: str
    tasks: Iterable
    load: Callable[[object], Sample | None]
    total: int | None = None
    skipped: list[str] = field(default_factory=list)


def _fashion_mnist(resolution: int | None, max_samples: int | None, ext: str) -> Source:
    images, labels = fashion_mnist.load("train")
    images = fashion_mnist.pad_to_32(images)
    n = len(images) if max_samples is None else min(max_samples, len(images))
    res = resolution or 32

    def load(i: int) -> Sample:
        img = Image.fromarray(images[i])
        if res != 32:  # upscaled copies for benchmarks / higher-resolution models
            img = img.resize((res, res), Image.Resampling.LANCZOS)
        return Sample(encode(img, ext), int(labels[i]), f"fashion-mnist/train/{i}")

    return Source("fashion-mnist", list(fashion_mnist.CLASSES), 1, res, ext, range(n), load, total=n)


def _folder(root: Path, resolution: int | None, max_samples: int | None, ext: str, seed: int) -> Source:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        classes = [p.name for p in class_dirs]
        files = [(f, label) for label, d in enumerate(class_dirs) for f in sorted(d.rglob("*"))
                 if f.suffix.lower() in FOLDER_EXTS]  # fmt: skip
    else:  # a flat folder is one class named after it
        classes = [root.name]
        files = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in FOLDER_EXTS]
    if not files:
        raise DataError(f"no images ({', '.join(sorted(FOLDER_EXTS))}) found in folder {str(root)!r}")
    # Class folders are read one after another; shuffling once here (seeded: the shards stay deterministic) is what
    # lets the loader's small shuffle window see every class.
    files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    if max_samples is not None:
        files = files[:max_samples]
    if resolution is None:
        with Image.open(files[0][0]) as im:
            resolution = min(im.size)
    res = resolution
    src = Source(root.name, classes, 3, res, ext, files, lambda t: None, total=len(files))

    def load(task) -> Sample | None:
        path, label = task
        try:
            with Image.open(path) as im:
                img = center_crop_resize(im.convert("RGB"), res)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            src.skipped.append(f"{path}: {e}")
            return None
        return Sample(encode(img, ext), label, str(path.relative_to(root)))

    src.load = load
    return src


def _webdataset(uri: str, resolution: int | None, max_samples: int | None, ext: str | None, env: Env) -> Source:
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    s3 = client(env)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = sorted(o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".tar"))
    except ClientError as e:
        raise DataError(describe_error(e, env, uri)) from None
    if not keys:
        raise DataError(f"no .tar shards under {uri}; expected a WebDataset prefix")
    try:
        old = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    except ClientError:
        old = {}
    first = next(_raw_samples(bucket, keys[:1], env), None)
    if first is None:
        raise DataError(f"{uri}: the first shard holds no sample with an image ({', '.join(IMAGE_EXTS)}) and .cls")
    with Image.open(io.BytesIO(first[1])) as im:
        first_size, first_mode = im.size, im.mode
    res = resolution or old.get("resolution") or min(first_size)
    out_ext = ext or ("png" if first[2] == "png" else "jpg")
    channels = old.get("channels") or (1 if first_mode in ("L", "LA", "I;16") else 3)
    src = Source(old.get("name") or prefix.rstrip("/").rsplit("/", 1)[-1] or bucket, list(old.get("classes", [])),
                 channels, res, out_ext, (), lambda t: None)  # fmt: skip

    def tasks():
        for i, item in enumerate(_raw_samples(bucket, keys, env, src.skipped)):
            if max_samples is not None and i >= max_samples:
                return
            yield item

    def load(task) -> Sample | None:
        source, data, in_ext, label = task
        try:
            with Image.open(io.BytesIO(data)) as im:
                ok = im.size == (res, res) and {"jpeg": "jpg"}.get(in_ext, in_ext) == out_ext
                if ok:  # already right: keep the exact bytes (no re-encode loss)
                    return Sample(data, label, source)
                img = center_crop_resize(im.convert("L" if channels == 1 else "RGB"), res)
        except (OSError, ValueError) as e:
            src.skipped.append(f"{source}: {e}")
            return None
        return Sample(encode(img, out_ext), label, source)

    src.tasks, src.load = tasks(), load
    return src


def _raw_samples(bucket: str, keys: list[str], env: Env, skipped: list | None = None):
    """(source, image bytes, ext, label) for every usable sample of the given tars, streamed."""
    for key in keys:
        stream = ObjectStream(bucket, key, env=env)
        try:
            for name, parts, _ in iter_tar_samples(stream, errors=skipped):
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                try:
                    label = int(parts["cls"])
                except (KeyError, ValueError):
                    label = None
                if ext is None or label is None:
                    if skipped is not None:
                        skipped.append(f"s3://{bucket}/{key}#{name}: no image or no .cls")
                    continue
                yield f"s3://{bucket}/{key}#{name}", parts[ext], ext, label
        finally:
            stream.close()


def resolve_source(source: str, *, resolution: int | None = None, max_samples: int | None = None,
                   image_format: str | None = None, seed: int = 0, env: Env | None = None) -> Source:  # fmt: skip
    if source == "fashion-mnist":
        return _fashion_mnist(resolution, max_samples, image_format or "png")
    if source.startswith("s3://"):
        return _webdataset(source, resolution, max_samples, image_format, env or Env.from_environ())
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder(path, resolution, max_samples, image_format or "jpg", seed)
    raise DataError(f"unknown dataset {source!r}; valid: {VALID_SOURCES}")


# ---------------------------------------------------------------------------------------------------------- tar I/O
class _Chunks:
    """Reads a stream in large chunks and hands out exact byte counts (network reads stay few and big)."""

    def __init__(self, fileobj, chunk: int = _MB):
        self.f, self.chunk, self.buf, self.at, self.pos = fileobj, chunk, b"", 0, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.buf):
            parts = [self.buf[self.at :]]
            have = len(parts[0])
            while have < n:
                data = self.f.read(max(self.chunk, n - have))
                if not data:
                    break
                parts.append(data)
                have += len(data)
            self.buf, self.at = b"".join(parts), 0
        out = self.buf[self.at : self.at + n]
        self.at += len(out)
        self.pos += len(out)
        return out


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):  # "<len> key=value"
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode()
    return None


def iter_tar_samples(fileobj, *, errors: list | None = None) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """Group a streamed WebDataset tar into samples: ``(key, {ext: bytes}, header offset of the sample)``.

    A minimal ustar/GNU/pax reader: ``tarfile``'s stream mode parses headers ~4× slower, which capped the loader at
    ~1.7k samples/s per thread. A truncated or corrupt tar ends the iteration (noted in ``errors`` if given)
    instead of raising: the samples before the damage are still good, and the last one holds only the parts read
    completely (the caller decides whether it is usable). Offsets count from where ``fileobj`` started.
    """
    r = _Chunks(fileobj)
    key, parts, start, long_name = None, {}, 0, None
    while True:
        at = r.pos
        hdr = r.take(512)
        if len(hdr) < 512 or hdr == bytes(512):  # clean end (or end-of-archive blocks)
            if hdr and len(hdr) < 512 and errors is not None:
                errors.append(f"truncated tar header after sample {key!r}")
            break
        chk = hdr[148:156].strip(b"\0 ")
        try:
            ok = int(chk, 8) == sum(hdr[:148]) + 256 + sum(hdr[156:])  # the checksum field counts as 8 spaces
            size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            ok = False
        if not ok:
            if errors is not None:
                errors.append(f"corrupt tar header at byte {at} after sample {key!r}")
            break
        data = r.take(size)
        r.take(-size % 512)
        if len(data) < size:
            if errors is not None:
                errors.append(f"truncated tar: member at byte {at} after sample {key!r} is cut short")
            break
        kind = hdr[156:157]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind in (b"x", b"g"):
            long_name = _pax_path(data) if kind == b"x" else long_name
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = hdr[:100].rstrip(b"\0").decode()
            if hdr[257:263] == b"ustar\0" and hdr[345]:  # POSIX ustar splits long paths into prefix + name
                name = hdr[345:500].rstrip(b"\0").decode() + "/" + name
        if kind not in (b"0", b"\0"):  # directories, links: not sample parts
            continue
        base = name.rsplit("/", 1)[-1]
        dot = base.find(".")
        if dot <= 0:  # hidden files and extension-less names are not sample parts
            continue
        k, ext = name[: len(name) - len(base) + dot], base[dot + 1 :]
        if k != key:
            if parts:
                yield key, parts, start
            key, parts, start = k, {}, at
        parts[ext] = data
    if parts:
        yield key, parts, start


class TarBuilder:
    """One shard being written: deterministic tar members, so equal input gives equal bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed by close()
        self.count = 0
        self.size = 1024  # end-of-archive blocks

    @staticmethod
    def cost(sample_parts: list[bytes]) -> int:
        return sum(512 + (len(b) + 511) // 512 * 512 for b in sample_parts)

    def add(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.size += self.cost(list(files.values()))
        self.count += 1

    def close(self) -> None:
        self.tar.close()


def write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's index (format v1.2) via DALI's own ``wds2idx``, so the format is DALI's by construction."""
    from wds2idx import IndexCreator  # installed by the nvidia-dali wheel

    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as ic:
        ic.create_index()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * _MB):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------- outputs
class ShardOutput:
    """Where finished shards go: an s3:// prefix (multipart upload) or a local folder (atomic rename)."""

    def __init__(self, out: str, env: Env):
        self.env = env
        self.s3 = out.startswith("s3://")
        if self.s3:
            self.bucket, prefix = split_s3_uri(out)
            self.prefix = prefix.rstrip("/") + "/" if prefix else ""
            self.client = client(env)
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                raise DataError(describe_error(e, env, out)) from None
        else:
            self.dir = Path(out).expanduser()
            self.dir.mkdir(parents=True, exist_ok=True)
        # Large parts keep the request count low; S3 only shows the object once the last part is in.
        self.transfer = TransferConfig(multipart_threshold=64 * _MB, multipart_chunksize=64 * _MB, max_concurrency=4)

    def has(self, name: str, sha256: str, size: int, metadata: dict[str, str] | None = None) -> bool:
        """Whether ``name`` is already in place with these bytes (and, in S3, this ``metadata``)."""
        if not self.s3:
            p = self.dir / name
            return p.exists() and p.stat().st_size == size and sha256_file(p) == sha256
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError:
            return False
        want = {"sha256": sha256, **(metadata or {})}
        have = head.get("Metadata", {})
        return head["ContentLength"] == size and all(have.get(k) == v for k, v in want.items())

    def put(self, local: Path, name: str, sha256: str | None = None, metadata: dict[str, str] | None = None) -> None:
        if not self.s3:
            tmp = self.dir / f".{name}.partial"
            shutil.copyfile(local, tmp)
            os.replace(tmp, self.dir / name)
            return
        meta = {**({"sha256": sha256} if sha256 else {}), **(metadata or {})}
        extra = {"Metadata": meta} if meta else {}
        self.client.upload_file(str(local), self.bucket, self.prefix + name, ExtraArgs=extra, Config=self.transfer)

    def put_bytes(self, data: bytes, name: str) -> None:
        if not self.s3:
            tmp = self.dir / f".{name}.partial"
            tmp.write_bytes(data)
            os.replace(tmp, self.dir / name)
            return
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)


def finish_shard(builder: TarBuilder, output: ShardOutput, metadata: dict[str, str] | None = None) -> tuple[dict, bool]:
    """Close ``builder``'s tar, index it and upload both unless already in place; returns the shard's manifest
    entry and whether the tar went up. The index goes first, so a tar in place means its index is too; with
    ``metadata`` (S3 user metadata for the tar) the tar also records its index's sha256, which ties the two."""
    builder.close()
    name, idx = builder.path.name, builder.path.with_suffix(".idx")
    write_index(builder.path, idx)
    entry = {"name": name, "index": idx.name, "count": builder.count, "bytes": builder.path.stat().st_size,
             "sha256": sha256_file(builder.path)}  # fmt: skip
    idx_sha = sha256_file(idx)
    if not output.has(idx.name, idx_sha, idx.stat().st_size):
        output.put(idx, idx.name, idx_sha)
    if metadata is not None:
        metadata = {**metadata, "index-sha256": idx_sha}
    uploaded = not output.has(name, entry["sha256"], entry["bytes"], metadata)
    if uploaded:
        output.put(builder.path, name, entry["sha256"], metadata)
    builder.path.unlink()
    idx.unlink()
    return entry, uploaded


def sample_files(image_ext: str, image: bytes, label: int, meta: dict) -> dict[str, bytes]:
    """One sample's tar members: the image, its label as ASCII (what DALI/webdataset read) and ``meta`` as JSON."""
    return {image_ext: image, "cls": str(label).encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def make_manifest(*, name: str, resolution: int, channels: int, classes: list[str], num_samples: int,
                  image_ext: str, shards: list[dict], **extra) -> dict:  # fmt: skip
    """``manifest.json``'s content; ``extra`` adds blocks (e.g. a synthetic export's ``synthetic``)."""
    return {
        "format": FORMAT,
        "name": name,
        "resolution": resolution,
        "channels": channels,
        "num_classes": len(classes),
        "classes": classes,
        "num_samples": num_samples,
        "image_ext": image_ext,
        "shards": sorted(shards, key=lambda s: s["name"]),
        **extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def progress_bar(disable: bool = False) -> Progress:
    """The shard writers' rich progress bar; its task takes an ``info`` field for a running summary."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))  # fmt: skip
    return Progress(*columns, disable=disable)


def _ordered_map(pool: ThreadPoolExecutor, fn, items: Iterable, window: int, chunk: int = 128) -> Iterator:
    """``pool.map`` that reads ``items`` lazily (a streamed source never sits whole in memory), order kept."""
    pending: deque[Future] = deque()

    def run(batch):
        return [fn(t) for t in batch]

    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == chunk:
            pending.append(pool.submit(run, batch))
            batch = []
            if len(pending) >= window:
                yield from pending.popleft().result()
    if batch:
        pending.append(pool.submit(run, batch))
    while pending:
        yield from pending.popleft().result()


def write_shards(
    source: str,
    out: str,
    *,
    resolution: int | None = None,
    shard_size_mb: float = 256,
    samples_per_shard: int = 5000,
    max_samples: int | None = None,
    image_format: str | None = None,
    workers: int = os.cpu_count() or 1,
    progress: bool = True,
    seed: int = 0,
    env: Env | None = None,
) -> dict:
    """Encode ``source`` into ``train-NNNNNN.tar`` shards under ``out`` and return the manifest written last.

    A shard closes at ``samples_per_shard`` samples or ``shard_size_mb``, whichever comes first. ``image_format``
    (png|jpg) defaults to PNG for Fashion-MNIST (lossless, tiny) and JPEG q95 for folders (photos: 5-10× smaller
    than PNG, faster to stream and to decode). Shards already present with the same sha256 are not uploaded again.
    """
    if image_format not in (None, "png", "jpg"):
        raise DataError(f"image_format={image_format!r} is invalid; expected png or jpg")
    if samples_per_shard < 1 or shard_size_mb <= 0:
        raise DataError("samples_per_shard must be ≥ 1 and shard_size_mb > 0")
    env = env or Env.from_environ()
    t0 = time.monotonic()
    src = resolve_source(source, resolution=resolution, max_samples=max_samples, image_format=image_format,
                         seed=seed, env=env)  # fmt: skip
    output = ShardOutput(out, env)
    max_bytes = int(shard_size_mb * _MB)
    shards: list[dict] = []
    labels_seen: set[int] = set()
    uploaded = skipped_uploads = 0

    with (
        tempfile.TemporaryDirectory(prefix="gf-shards-") as tmp,
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="gf-encode") as pool,
        ThreadPoolExecutor(2, thread_name_prefix="gf-upload") as uploads,
        progress_bar(disable=not progress) as bar,
    ):
        task = bar.add_task(f"sharding {src.name}", total=src.total, info="")
        in_flight: deque[Future] = deque()

        def finish(builder: TarBuilder) -> None:
            nonlocal uploaded, skipped_uploads
            entry, went_up = finish_shard(builder, output)
            uploaded += went_up
            skipped_uploads += not went_up
            shards.append(entry)
            bar.update(task, info=f"{len(shards)} shards, {uploaded} uploaded, {skipped_uploads} already there")

        builder: TarBuilder | None = None
        n = num_shards = 0
        for sample in _ordered_map(pool, src.load, src.tasks, window=4 * max(1, workers)):
            bar.advance(task)
            if sample is None:
                continue
            meta = {"label": sample.label, "class": _class_name(src.classes, sample.label), "source": sample.source}
            files = sample_files(src.image_ext, sample.image, sample.label, meta)
            if builder and (builder.count >= samples_per_shard or builder.size + builder.cost(list(files.values()))
                            > max_bytes):  # fmt: skip
                in_flight.append(uploads.submit(finish, builder))
                while len(in_flight) > 2:  # bounded local disk: at most a few finished shards wait for upload
                    in_flight.popleft().result()
                builder = None
            if builder is None:
                builder = TarBuilder(Path(tmp) / f"train-{num_shards:06d}.tar")
                num_shards += 1
            builder.add(f"{n:08d}", files)
            labels_seen.add(sample.label)
            n += 1
        if builder:
            in_flight.append(uploads.submit(finish, builder))
        for f in in_flight:
            f.result()

    if n == 0:
        raise DataError(f"{source}: no usable samples ({len(src.skipped)} skipped)")
    if src.skipped:
        log.warning("%s: skipped %d unreadable samples, e.g. %s", source, len(src.skipped), src.skipped[0])
    classes = src.classes or [str(i) for i in range(max(labels_seen) + 1)]
    manifest = make_manifest(name=src.name, resolution=src.resolution, channels=src.channels, classes=classes,
                             num_samples=n, image_ext=src.image_ext, shards=shards)  # fmt: skip
    output.put_bytes(json.dumps(manifest, indent=1).encode(), "manifest.json")
    log.info("wrote %d samples in %d shards to %s in %.1f s (%d uploaded, %d already there)", n, len(shards), out,
             time.monotonic() - t0, uploaded, skipped_uploads)  # fmt: skip
    return manifest


def _class_name(classes: list[str], label: int) -> str:
    return classes[label] if 0 <= label < len(classes) else str(label)


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without ``created``: it names the data, not when it was written."""
    content = {k: v for k, v in manifest.items() if k != "created"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
