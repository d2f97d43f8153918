"""Shard writing and reading without S3: tar layout, manifest, DALI index, folder sources, damage handling."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import time

import numpy as np
import pytest
from botocore.exceptions import ResponseStreamingError
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from orchestrator.data import fashion_mnist
from orchestrator.data import s3 as s3mod
from orchestrator.data.cache import ShardCache
from orchestrator.data.images import center_crop_resize, image_size
from orchestrator.data.manifest import Manifest, ShardEntry
from orchestrator.data.s3 import DataError, ObjectStream
from orchestrator.data.stream import indexed_samples, sample_from_parts
from orchestrator.data.tar import ShardIndex, iter_tar_samples
from orchestrator.data.writer import write_shards


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm")
    manifest = write_shards(
        "fashion-mnist", str(out), max_samples=250, samples_per_shard=100, progress=False, workers=2
    )
    return out, manifest


def test_tar_layout_and_keys(fmnist):
    out, _ = fmnist
    with tarfile.open(out / "train-000000.tar") as tf:
        names = tf.getnames()
        first_json = json.loads(tf.extractfile("00000000.json").read())
        first_cls = tf.extractfile("00000000.cls").read()
        png = tf.extractfile("00000000.png").read()
    assert names[:6] == [
        "00000000.png",
        "00000000.cls",
        "00000000.json",
        "00000001.png",
        "00000001.cls",
        "00000001.json",
    ]
    assert len(names) == 300
    images, labels = fashion_mnist.load("train")
    assert first_cls == str(labels[0]).encode()
    assert first_json == {
        "label": int(labels[0]),
        "class": fashion_mnist.CLASSES[labels[0]],
        "source": "fashion-mnist/train/0",
    }
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    assert decoded.shape == (32, 32) and np.array_equal(decoded, fashion_mnist.pad_to_32(images[:1])[0])


def test_manifest_fields(fmnist):
    out, manifest = fmnist
    assert Manifest.from_json((out / "manifest.json").read_text(), "manifest.json") == manifest
    assert json.loads((out / "manifest.json").read_text()) == manifest.to_json()
    fields = manifest.to_json()
    assert {
        k: fields[k] for k in ("format", "name", "resolution", "channels", "num_classes", "num_samples", "image_ext")
    } == {
        "format": 1,
        "name": "fashion-mnist",
        "resolution": 32,
        "channels": 1,
        "num_classes": 10,
        "num_samples": 250,
        "image_ext": "png",
    }
    assert manifest.classes == tuple(fashion_mnist.CLASSES) and fields["classes"] == fashion_mnist.CLASSES
    assert [s.count for s in manifest.shards] == [100, 100, 50]
    assert [(s.name, s.index) for s in manifest.shards][1] == ("train-000001.tar", "train-000001.idx")
    for s in manifest.shards:
        assert (out / s.name).stat().st_size == s.bytes and len(s.sha256) == 64
    # the hash names the data: stable across re-writes, blind to `created`, sensitive to content
    assert manifest.hash == dataclasses.replace(manifest, created="another day").hash
    assert manifest.hash != dataclasses.replace(manifest, num_samples=251).hash


def test_rewrite_is_byte_identical(fmnist, tmp_path):
    _, manifest = fmnist
    again = write_shards("fashion-mnist", str(tmp_path), max_samples=250, samples_per_shard=100, progress=False)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_dali_reads_our_index(fmnist):
    out, manifest = fmnist
    shard = manifest.shards[1]

    @pipeline_def(batch_size=shard.count, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(
            paths=[str(out / shard.name)],
            index_paths=[str(out / shard.index)],
            ext=["png", "cls"],
            missing_component_behavior="error",
        )
        return fn.decoders.image(img, device="cpu", output_type=types.GRAY), cls

    p = pipe()
    p.build()
    assert p.epoch_size()["__Webdataset_0"] == shard.count
    imgs, cls = p.run()
    labels = [int(bytes(np.asarray(cls[i])).decode()) for i in range(shard.count)]
    images, expected = fashion_mnist.load("train")
    assert labels == expected[100:200].tolist()
    assert np.array_equal(np.asarray(imgs[0])[..., 0], fashion_mnist.pad_to_32(images[100:101])[0])


def _image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_source_labels_and_resolution(tmp_path):
    src = tmp_path / "photos"
    _image(src / "zebra" / "z1.png", (40, 30), (255, 255, 255))
    _image(src / "ant" / "a1.jpg", (20, 50), (0, 0, 0))
    _image(src / "ant" / "deep" / "a2.png", (16, 16), (0, 0, 0))
    (src / "ant" / "notes.txt").write_text("not an image")
    manifest = write_shards(str(src), str(tmp_path / "out"), resolution=16, image_format="png", progress=False)
    assert manifest.classes == ("ant", "zebra") and manifest.num_classes == 2
    assert (manifest.resolution, manifest.channels, manifest.image_ext) == (16, 3, "png")
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tf:
        metas = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
        sizes = {Image.open(tf.extractfile(m)).size for m in tf.getmembers() if m.name.endswith(".png")}
    by_source = {m["source"]: (m["label"], m["class"]) for m in metas}
    assert by_source == {"ant/a1.jpg": (0, "ant"), "ant/deep/a2.png": (0, "ant"), "zebra/z1.png": (1, "zebra")}
    assert sizes == {(16, 16)}


def test_center_crop_keeps_the_middle():
    # a 60×20 image: red | green | blue thirds; the centred 20×20 square is the green one
    img = Image.new("RGB", (60, 20))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        img.paste(colour, (20 * i, 0, 20 * i + 20, 20))
    out = np.asarray(center_crop_resize(img, 8))
    assert out.shape == (8, 8, 3)
    assert np.all(out[..., 1] == 255) and np.all(out[..., 0] == 0) and np.all(out[..., 2] == 0)
    tall = np.asarray(center_crop_resize(img.rotate(90, expand=True), 10))
    assert tall.shape == (10, 10, 3) and np.all(tall[..., 1] == 255)


def test_unknown_dataset_names_the_choices(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'cifar-11'; valid: fashion-mnist, a folder path, or an s3"):
        write_shards("cifar-11", str(tmp_path), progress=False)


def test_tar_reader_survives_truncation(fmnist):
    out, _ = fmnist
    data = (out / "train-000000.tar").read_bytes()
    whole = list(iter_tar_samples(io.BytesIO(data)))
    idx = (out / "train-000000.idx").read_text().splitlines()
    assert len(whole) == 100 and whole[1][0] == "00000001" and set(whole[0][1]) == {"png", "cls", "json"}
    assert [s[2] for s in whole] == [int(line.split()[1]) - 512 for line in idx[1:]]  # offsets agree with DALI's
    errors = []
    cut = list(iter_tar_samples(io.BytesIO(data[: whole[40][2] + 700]), errors=errors))
    assert len(cut) == 40 and errors and "truncated" in errors[0]
    assert cut[-1][1] == whole[39][1]  # the sample before the cut is whole
    cut = list(iter_tar_samples(io.BytesIO(data[: whole[40][2] + 1600]), errors=[]))  # png in, .cls cut
    assert len(cut) == 41 and set(cut[-1][1]) == {"png"}


def test_image_checks_catch_damage(fmnist):
    out, _ = fmnist
    with tarfile.open(out / "train-000000.tar") as tf:
        png = tf.extractfile("00000000.png").read()
    assert image_size(png) == (32, 32)
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 1
    assert image_size(bytes(flipped)) is None
    assert image_size(png[:-20]) is None and image_size(b"GIF89a...") is None
    buf = io.BytesIO()
    Image.new("RGB", (24, 12), (10, 200, 30)).save(buf, "JPEG", quality=95)
    jpg = buf.getvalue()
    assert image_size(jpg) == (24, 12) and image_size(jpg[: len(jpg) // 2]) is None


class _FlakyClient:
    """get_object whose body breaks once after ``break_at`` bytes, like an S3 restart mid-stream."""

    def __init__(self, data: bytes, break_at: int):
        self.data, self.break_at, self.ranges = data, break_at, []

    def get_object(self, Bucket, Key, Range=None):
        start = int(Range.split("=")[1].rstrip("-")) if Range else 0
        self.ranges.append(start)
        client = self

        class Body:
            pos = start

            def read(self, n=None):
                end = min(self.pos + min(n or 1 << 30, 1 << 16), len(client.data))  # a socket's partial reads
                if client.break_at is not None and end > client.break_at:
                    client.break_at = None
                    raise ResponseStreamingError(error="connection reset")
                chunk, self.pos = client.data[self.pos : end], end
                return chunk

            def close(self):
                pass

        return {"Body": Body()}


def test_object_stream_resumes_at_the_exact_byte(monkeypatch, fmnist):
    out, _ = fmnist
    data = (out / "train-000001.tar").read_bytes()
    fake = _FlakyClient(data, break_at=len(data) // 3 + 17)
    monkeypatch.setattr(s3mod, "client", lambda *a, **kw: fake)
    stream = ObjectStream("b", "k", env=object())
    samples = list(iter_tar_samples(stream))
    assert len(samples) == 100 and stream.reopens == 1 and fake.ranges[0] == 0 and fake.ranges[1] > 0
    assert [s[0] for s in samples] == [s[0] for s in iter_tar_samples(io.BytesIO(data))]


def test_index_path_cuts_the_same_samples_as_the_tar_parser(fmnist):
    out, manifest = fmnist
    entry = manifest.shards[0]
    data = (out / entry.name).read_bytes()
    idx = ShardIndex.parse((out / entry.index).read_bytes(), entry.count)
    assert idx is not None and idx.count == 100
    parsed = [sample_from_parts(parts, 32) for _, parts, _ in iter_tar_samples(io.BytesIO(data))]
    base = idx.start[30]  # a resumed read starts at a sample's first header
    cut = indexed_samples(idx, data[:base], 0, 0, 30, 32) + indexed_samples(idx, data[base:], base, 30, 100, 32)
    assert [(a[0].tobytes(), a[1], a[2]) for a in cut] == [(b[0].tobytes(), b[1], b[2]) for b in parsed]
    # damage: a tar header that disagrees with the index, a bad label, a broken image → exactly those are holes
    bad = bytearray(data)
    bad[idx.heads[idx.first[3]] + 124 : idx.heads[idx.first[3]] + 136] = b"00000000077\0"  # size field
    label_at = idx.cls[5][0]
    bad[label_at] = ord("x")
    png_at, png_len = idx.img[7][:2]
    bad[png_at + png_len // 2] ^= 1
    holes = [i for i, s in enumerate(indexed_samples(idx, bytes(bad), 0, 0, 100, 32)) if s is None]
    assert holes == [3, 5, 7]
    # an index that does not describe the shard is refused, so the loader parses the tar instead
    assert ShardIndex.parse((out / entry.index).read_bytes(), entry.count + 1) is None
    assert ShardIndex.parse(b"not an index", entry.count) is None


def test_shard_cache_keeps_verified_shards_under_its_cap(tmp_path):
    entries = [ShardEntry(f"train-{i:06d}.tar", "", 1, 1000, f"{i:064x}") for i in range(5)]
    cache = ShardCache(str(tmp_path), max_bytes=3500)
    for i, e in enumerate(entries):
        f = cache.writer(e)
        f.write(bytes(1000))
        cache.commit(e, f, ok=i != 2)  # shard 2 failed its checksum: never cached
        time.sleep(0.01)  # distinct mtimes: eviction order is well defined
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == [cache.path(e).name for e in (entries[1], entries[3], entries[4])]  # oldest evicted, no partials
    assert cache.open(entries[2]) is None and cache.open(entries[0]) is None
    with cache.open(entries[3]) as f:
        assert f.read() == bytes(1000)
    assert (
        cache.writer(dataclasses.replace(entries[0], bytes=4000)) is None
    )  # larger than the whole cache: not worth copying
