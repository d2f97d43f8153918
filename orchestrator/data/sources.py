"""Where a dataset's samples come from: Fashion-MNIST, a folder of images (one class per subfolder) or an ``s3://``
WebDataset prefix. Each source is a list of cheap tasks and a ``load`` that turns one into an encoded sample."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from botocore.exceptions import ClientError
from PIL import Image

from orchestrator.data import fashion_mnist
from orchestrator.data.errors import DataError
from orchestrator.data.images import IMAGE_EXTS, center_crop_resize, encode
from orchestrator.data.s3 import ObjectStream, client, describe_error, find_manifest, split_prefix
from orchestrator.data.tar import iter_tar_samples
from orchestrator.env import Env

FOLDER_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
VALID_SOURCES = "fashion-mnist, a folder path, or an s3:// WebDataset prefix"


@dataclass
class Sample:
    image: bytes
    label: int
    source: str


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
        files = [(f, label) for label, d in enumerate(class_dirs) for f in sorted(d.rglob("*"))]
        files = [(f, label) for f, label in files if f.suffix.lower() in FOLDER_EXTS]
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
    bucket, prefix = split_prefix(uri)
    s3 = client(env)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = sorted(o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".tar"))
    except ClientError as e:
        raise DataError(describe_error(e, env, uri)) from None
    if not keys:
        raise DataError(f"no .tar shards under {uri}; expected a WebDataset prefix")
    try:  # a ganforge manifest there knows the dataset's name, classes and size; without one the shards tell
        old = find_manifest(bucket, prefix, env)
    except DataError:
        old = None
    first = next(_raw_samples(bucket, keys[:1], env), None)
    if first is None:
        raise DataError(f"{uri}: the first shard holds no sample with an image ({', '.join(IMAGE_EXTS)}) and .cls")
    with Image.open(io.BytesIO(first[1])) as im:
        first_size, first_mode = im.size, im.mode
    res = resolution or (old.resolution if old else None) or min(first_size)
    out_ext = ext or ("png" if first[2] == "png" else "jpg")
    channels = old.channels if old else (1 if first_mode in ("L", "LA", "I;16") else 3)
    name = (old.name if old else "") or prefix.rstrip("/").rsplit("/", 1)[-1] or bucket
    src = Source(name, list(old.classes) if old else [], channels, res, out_ext, (), lambda t: None)

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


def resolve_source(
    source: str,
    *,
    resolution: int | None = None,
    max_samples: int | None = None,
    image_format: str | None = None,
    seed: int = 0,
    env: Env | None = None,
) -> Source:
    if source == "fashion-mnist":
        return _fashion_mnist(resolution, max_samples, image_format or "png")
    if source.startswith("s3://"):
        return _webdataset(source, resolution, max_samples, image_format, env or Env.from_environ())
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder(path, resolution, max_samples, image_format or "jpg", seed)
    raise DataError(f"unknown dataset {source!r}; valid: {VALID_SOURCES}")
