"""The data plane against a real S3 (SeaweedFS from the session stack): shards → S3 → per-rank DALI loader."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config import DataConfig
from orchestrator.data import fashion_mnist
from orchestrator.data import s3 as s3mod
from orchestrator.data import stream as stream_mod
from orchestrator.data.loader import ShardLoader
from orchestrator.data.manifest import Manifest
from orchestrator.data.s3 import DataError, check_prefix
from orchestrator.data.writer import write_shards
from orchestrator.env import Env
from tests.damage import scramble_png

pytestmark = pytest.mark.integration

N, PER_SHARD, BATCH = 4000, 500, 50


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://ganforge/datasets/fmnist-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    manifest = write_shards("fashion-mnist", uri, max_samples=N, samples_per_shard=PER_SHARD, progress=False)
    print(f"\nwrote {N} samples in {len(manifest.shards)} shards in {time.monotonic() - t0:.1f} s")
    return uri, manifest


@pytest.fixture(scope="module")
def reference():
    """The same samples as numpy, padded like the shards: uint8 N×32×32, and pixel bytes → sample count."""
    images, labels = fashion_mnist.load("train")
    images = fashion_mnist.pad_to_32(images[:N])
    return images, labels[:N]


def _cfg(uri: str, **kw) -> DataConfig:
    return DataConfig(dataset=uri, **{"batch_size": BATCH, "hflip": False, "shuffle_buffer": 256, **kw})


def _epoch(loader: ShardLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly one epoch's good samples (the last batch may run into the next epoch: cut there)."""
    xs, ys = [], []
    it = iter(loader)
    while sum(len(y) for y in ys) < loader.epoch_size - loader.skipped:
        x, y = next(it)
        xs.append(x)
        ys.append(y)
    n = loader.epoch_size - loader.skipped
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float N×3×H×W back to the stored uint8 grey N×H×W (exact: the transform is affine)."""
    return (x[:, 0] * 127.5 + 127.5).round().to(torch.uint8).numpy()


def _counts(images: np.ndarray) -> collections.Counter:
    return collections.Counter(img.tobytes() for img in images)


def test_manifest_in_bucket(s3, dataset):
    uri, manifest = dataset
    prefix = uri.split("/", 3)[3]
    stored = s3.get_object(Bucket="ganforge", Key=f"{prefix}/manifest.json")["Body"].read()
    assert json.loads(stored) == manifest.to_json()
    assert Manifest.from_json(stored, uri) == manifest == check_prefix(uri)
    assert manifest.num_samples == N and len(manifest.shards) == N // PER_SHARD
    assert (manifest.resolution, manifest.channels, manifest.num_classes) == (32, 1, 10)
    keys = {o["Key"].rsplit("/", 1)[1] for o in s3.list_objects_v2(Bucket="ganforge", Prefix=prefix)["Contents"]}
    assert {s.name for s in manifest.shards} | {s.index for s in manifest.shards} <= keys
    assert len(manifest.hash) == 64


@pytest.mark.parametrize("threads", [1, 3])  # 3: three single-threaded DALI pipelines taking batches in turn
def test_batches_match_the_numpy_data(dataset, reference, threads):
    uri, _ = dataset
    with ShardLoader(_cfg(uri, num_threads=threads), rank=0, world_size=1) as loader:
        assert (loader.resolution, loader.num_classes, len(loader.shards)) == (32, 10, N // PER_SHARD)
        assert loader.channels == 1
        x, y = _epoch(loader)
    assert x.shape == (N, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.device.type == "cpu"
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated into RGB
    with ShardLoader(_cfg(uri, num_threads=threads)) as loader:
        first = next(iter(loader))[0]
    # one grey channel decoded and normalised, handed over as a broadcast view: the loader makes no RGB copy
    assert first.shape == (BATCH, 3, 32, 32) and first.stride(1) == 0 and torch.equal(first, x[:BATCH])
    images, labels = reference
    expected_mean = (images.astype(np.float64) / 127.5 - 1).mean()
    assert abs(x.double().mean().item() - expected_mean) < 1e-4
    assert _counts(_to_uint8(x)) == _counts(images)  # every sample exactly once, pixel-exact
    by_image = {img.tobytes(): int(lbl) for img, lbl in zip(images, labels)}
    assert [by_image[img.tobytes()] for img in _to_uint8(x)] == y.tolist()  # labels travel with their images


def test_two_ranks_are_disjoint_and_cover_the_epoch(dataset, reference):
    """2 ranks × 2 loader workers (DALI pipelines, dealt whole batches in turn from the rank's one stream)."""
    uri, _ = dataset
    seen = []
    for rank in range(2):
        with ShardLoader(_cfg(uri, num_threads=2), rank=rank, world_size=2) as loader:
            seen.append(_to_uint8(_epoch(loader)[0]))
    a, b = _counts(seen[0]), _counts(seen[1])
    assert sum(a.values()) == sum(b.values()) == N // 2
    assert a + b == _counts(reference[0])
    with pytest.raises(DataError, match="ranks need at least one"):
        ShardLoader(_cfg(uri), rank=0, world_size=N // PER_SHARD + 1)


def test_random_crops_cut_the_drawn_box(dataset):
    """crop_scale < 1: each image is the box drawn for its position, resized back (checked against PIL's bilinear
    resize of the same box); the order of samples is the same as without crops."""
    uri, _ = dataset
    cfg = _cfg(uri, batch_size=64, shuffle_buffer=1)
    with ShardLoader(cfg) as loader:
        plain = next(iter(loader))[0]
    with ShardLoader(dataclasses.replace(cfg, crop_scale=0.4)) as loader:
        cropped = next(iter(loader))[0]
        boxes = np.stack([loader.order.window_order(0, i, 1)[1][0, 1:] for i in range(64)])  # y0, x0, y1, x1
    side = boxes[:, 2] - boxes[:, 0]
    assert np.allclose(boxes[:, 3] - boxes[:, 1], side, atol=1e-6) and (side**2 >= 0.4 - 1e-6).all()
    assert (side < 0.9).sum() > 20 and boxes[:, :2].min() >= 0 and boxes[:, 2:].max() <= 1 + 1e-6
    expected = []
    for img, (y0, x0, y1, x1) in zip(_to_uint8(plain), boxes * 32):
        out = Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1))
        expected.append(np.asarray(out, np.float32) / 127.5 - 1)
    err = (cropped[:, 0] - torch.from_numpy(np.stack(expected))).abs().mean((1, 2))
    assert err.max() < 0.03, err.max()  # resampling rounding only; the uncropped image is far off:
    assert (plain[:, 0] - cropped[:, 0]).abs().mean((1, 2))[side < 0.8].min() > 0.05


def test_colour_images_keep_their_channels(s3, tmp_path):
    """An RGB image folder (class sub-folders) → shards → loader: three real channels, pixel-exact, flips applied."""
    images, labels = fashion_mnist.load("train")
    images, labels = fashion_mnist.pad_to_32(images[:120]), labels[:120]
    # three different channels from each real image, so a swapped, dropped or averaged channel shows
    rgb = np.stack([images, 255 - images, (images // 2 + 64).astype(np.uint8)], axis=-1)
    for i, (img, lbl) in enumerate(zip(rgb, labels)):
        folder = tmp_path / "colour" / fashion_mnist.CLASSES[lbl]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    uri = f"s3://ganforge/datasets/colour-{uuid.uuid4().hex[:8]}"
    manifest = write_shards(
        str(tmp_path / "colour"), uri, image_format="png", samples_per_shard=40, progress=False, workers=1
    )
    assert (manifest.channels, manifest.resolution, manifest.num_samples) == (3, 32, 120)
    with ShardLoader(_cfg(uri, batch_size=24, hflip=True, num_threads=2)) as loader:
        assert loader.channels == 3
        x, _ = _epoch(loader)
    assert x.shape == (120, 3, 32, 32) and x.is_contiguous()
    got = (x * 127.5 + 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # N×H×W×3
    flipped = got[:, :, ::-1]
    want = _counts(rgb)
    matches = [img.tobytes() in want for img in got]
    assert all(m or f.tobytes() in want for m, f in zip(matches, flipped))  # every image exact, mirrored or not
    assert 30 < sum(not m for m in matches) < 90  # about half of them mirrored
    assert _counts(np.where(np.array(matches)[:, None, None, None], got, flipped)) == want  # each exactly once


# the stream does not depend on how many pipelines decode it; random crops are part of the position too
@pytest.mark.parametrize("threads,crop", [((1, 1), 1.0), ((3, 2), 0.6)])
def test_resume_continues_with_the_next_sample(dataset, threads, crop):
    uri, _ = dataset
    cfg = _cfg(uri, hflip=True, batch_size=48, num_threads=threads[0], crop_scale=crop)
    with ShardLoader(cfg) as loader:
        it = iter(loader)
        for _ in range(7):  # stop mid-window (window 256) and mid-shard
            next(it)
        state = json.loads(json.dumps(loader.state_dict()))
        expected = [next(it) for _ in range(90)]  # runs past the epoch end (4000 / 48)
    assert state["position"] == 7 * 48 and expected[-1][0].shape[0] == 48
    with ShardLoader(dataclasses.replace(cfg, num_threads=threads[1])) as resumed:
        resumed.load_state_dict(state)
        it = iter(resumed)
        for i, (x, y) in enumerate(expected):
            rx, ry = next(it)
            assert torch.equal(rx, x) and torch.equal(ry, y), f"batch {i} differs after resume"
        assert resumed.epoch == 1


def test_wrong_secret_and_missing_prefix(stack, dataset):
    uri, _ = dataset
    bad = dataclasses.replace(Env.from_environ(), secret_key="not-the-secret-" + uuid.uuid4().hex)
    with pytest.raises(DataError) as e:
        check_prefix(uri, bad)
    msg = str(e.value)
    assert "rejected the credentials" in msg and bad.access_key in msg and bad.secret_key not in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match=r"no manifest.json under s3://ganforge/datasets/nope.*ganforge shards"):
        check_prefix("s3://ganforge/datasets/nope")
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        check_prefix("s3://no-such-bucket/x")
    with pytest.raises(DataError, match="cannot reach S3"):
        t0 = time.monotonic()
        check_prefix(uri, dataclasses.replace(Env.from_environ(), s3_endpoint="http://127.0.0.1:9"))
    assert time.monotonic() - t0 < 15  # fails fast


def test_rerun_skips_shards_already_there(monkeypatch, s3, dataset):
    uri, manifest = dataset
    prefix = uri.split("/", 3)[3]
    uploads = []
    c = s3mod.client()  # the process's cached client, the one write_shards uploads with
    real = c.upload_file
    monkeypatch.setattr(c, "upload_file", lambda *a, **kw: (uploads.append(a[2]), real(*a, **kw)))
    again = write_shards("fashion-mnist", uri, max_samples=N, samples_per_shard=PER_SHARD, progress=False)
    assert uploads == [] and again.hash == manifest.hash
    s3.delete_object(Bucket="ganforge", Key=f"{prefix}/train-000003.tar")  # an interrupted first run
    write_shards("fashion-mnist", uri, max_samples=N, samples_per_shard=PER_SHARD, progress=False)
    assert uploads == [f"{prefix}/train-000003.tar"]


def _copy_dataset(client, uri: str) -> tuple[str, str]:
    """A private copy of the dataset to damage."""
    src = uri.split("/", 3)[3]
    dst = f"datasets/damaged-{uuid.uuid4().hex[:8]}"
    for o in client.list_objects_v2(Bucket="ganforge", Prefix=src + "/")["Contents"]:
        name = o["Key"].rsplit("/", 1)[1]
        client.copy_object(Bucket="ganforge", Key=f"{dst}/{name}", CopySource={"Bucket": "ganforge", "Key": o["Key"]})
    return f"s3://ganforge/{dst}", dst


def _png_in_copy(client, uri: str, shard: str, sample: int) -> tuple[str, str, str, bytearray, int, int]:
    """A private copy of the dataset: (its uri, prefix, the shard's key, the shard's bytes, and where sample
    ``sample``'s PNG lies in them: offset, size)."""
    bad_uri, prefix = _copy_dataset(client, uri)
    key = f"{prefix}/{shard}.tar"
    tar = bytearray(client.get_object(Bucket="ganforge", Key=key)["Body"].read())
    idx = client.get_object(Bucket="ganforge", Key=f"{prefix}/{shard}.idx")["Body"].read().decode().splitlines()
    ext, offset, size = idx[sample].split()[:3]
    assert ext == "png"
    return bad_uri, prefix, key, tar, int(offset), int(size)


def test_corrupt_image_is_skipped_and_counted(s3, dataset, reference):
    uri, _ = dataset
    bad_uri, _, key, tar, offset, size = _png_in_copy(s3, uri, "train-000002", 10)
    for i in range(offset + 40, offset + size - 16, 7):  # scramble the IDAT data, same length
        tar[i] ^= 0x5A
    s3.put_object(Bucket="ganforge", Key=key, Body=bytes(tar))
    with ShardLoader(_cfg(bad_uri, batch_size=40)) as loader:
        x, _ = _epoch(loader)
        assert loader.skipped == 1 and loader.checksum_errors == 1
    assert len(x) == N - 1
    lost = _counts(reference[0]) - _counts(_to_uint8(x))
    assert sum(lost.values()) == 1


def _decoder_rejects_one_image(s3, uri: str) -> str:
    """A private copy of the dataset where one PNG's data is scrambled under a recomputed CRC (and the manifest's
    sha256 fixed): it passes the cheap checks and only the decoder rejects it."""
    bad_uri, prefix, key, tar, offset, size = _png_in_copy(s3, uri, "train-000001", 20)
    scramble_png(tar, offset, size)
    fixed = json.loads(s3.get_object(Bucket="ganforge", Key=f"{prefix}/manifest.json")["Body"].read())
    next(e for e in fixed["shards"] if e["name"] == "train-000001.tar")["sha256"] = hashlib.sha256(tar).hexdigest()
    s3.put_object(Bucket="ganforge", Key=key, Body=bytes(tar))
    s3.put_object(Bucket="ganforge", Key=f"{prefix}/manifest.json", Body=json.dumps(fixed).encode())
    return bad_uri


def test_image_only_the_decoder_rejects_is_skipped(s3, dataset, reference, caplog):
    """DALI fails on the bad image's batch, the loader finds the bad image with PIL and sends the rest of the batch
    again, in stream order, with several pipelines."""
    bad_uri = _decoder_rejects_one_image(s3, dataset[0])
    with ShardLoader(_cfg(bad_uri, batch_size=40, num_threads=2)) as loader:
        x, _ = _epoch(loader)
        assert loader.skipped == 1 and loader.checksum_errors == 0
    assert "DALI could not decode a batch; 1 of 40 images were bad" in caplog.text
    assert len(x) == N - 1
    lost = _counts(reference[0]) - _counts(_to_uint8(x))
    assert sum(lost.values()) == 1


def test_image_the_decoder_rejects_in_the_very_first_batch_is_skipped(s3, dataset, reference):
    """A batch of the whole epoch holds the bad image in the first batch, which DALI's iterator used to decode when
    it was built, outside the loader's recovery: the loader failed instead of skipping the image."""
    bad_uri = _decoder_rejects_one_image(s3, dataset[0])
    with ShardLoader(_cfg(bad_uri, batch_size=N, num_threads=1, prefetch=1)) as loader:  # one batch in flight
        x, _ = next(iter(loader))
        assert loader.skipped == 1
    # the N − 1 good images, topped up to a full batch by the next epoch's first sample
    assert len(x) == N and sum((_counts(reference[0]) - _counts(_to_uint8(x))).values()) == 1


def test_truncated_shard(s3, dataset, reference):
    uri, manifest = dataset
    bad_uri, prefix = _copy_dataset(s3, uri)
    key = f"{prefix}/train-000005.tar"
    tar = s3.get_object(Bucket="ganforge", Key=key)["Body"].read()
    cut = tar[: len(tar) // 2 + 700]  # mid-member
    s3.put_object(Bucket="ganforge", Key=key, Body=cut)
    with pytest.raises(DataError, match=r"train-000005.tar is \d+ bytes but manifest.json says"):
        ShardLoader(_cfg(bad_uri))  # caught before training starts
    # A writer that produced the short shard and described it honestly: the rest of the shard is skipped, counted.
    fixed = manifest.to_json()
    entry = next(s for s in fixed["shards"] if s["name"] == "train-000005.tar")
    entry.update(bytes=len(cut), sha256=hashlib.sha256(cut).hexdigest())
    s3.put_object(Bucket="ganforge", Key=f"{prefix}/manifest.json", Body=json.dumps(fixed).encode())
    with ShardLoader(_cfg(bad_uri, batch_size=10)) as loader:
        x, _ = _epoch(loader)
        skipped = loader.skipped
    assert 0 < skipped < PER_SHARD and len(x) == N - skipped
    assert sum((_counts(reference[0]) - _counts(_to_uint8(x))).values()) == skipped


def test_s3_restart_mid_epoch_yields_every_sample_once(stack, dataset, reference):
    uri, _ = dataset
    loader = ShardLoader(_cfg(uri, batch_size=BATCH, shuffle_buffer=64))
    it = iter(loader)
    first = [next(it)[0] for _ in range(4)]
    stack.stop_service("s3")
    restarter = threading.Timer(2.0, stack.start_service, args=("s3",))
    restarter.start()
    try:
        rest = [next(it)[0] for _ in range(N // BATCH - 4)]
    finally:
        restarter.join()
        loader.close()
    x = torch.cat(first + rest)
    assert _counts(_to_uint8(x)) == _counts(reference[0]) and loader.skipped == 0
    assert loader.checksum_errors == 0


def test_shard_cache_serves_later_epochs_identically(monkeypatch, tmp_path, dataset):
    uri, manifest = dataset
    opened = []

    class Counting(stream_mod.ObjectStream):
        def __init__(self, bucket, key, **kw):
            opened.append(key.rsplit("/", 1)[1])
            super().__init__(bucket, key, **kw)

    monkeypatch.setattr(stream_mod, "ObjectStream", Counting)
    batches = N // BATCH
    with ShardLoader(_cfg(uri, hflip=True)) as plain:
        it = iter(plain)
        expected = [next(it) for _ in range(2 * batches)]
    opened.clear()
    cache = tmp_path / "cache"
    with ShardLoader(_cfg(uri, hflip=True, cache_dir=str(cache))) as cached:
        it = iter(cached)
        for i in range(2 * batches):  # epoch 1 streams every shard once, verified and cached; epoch 2 reads those
            x, y = next(it)
            assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1]), f"batch {i} differs"
    tars = [o for o in opened if o.endswith(".tar")]
    assert sorted(tars) == sorted(s.name for s in manifest.shards)  # epoch 2 came from the cache alone
    assert sorted(p.name.split("-", 1)[1] for p in cache.glob("*.tar")) == sorted(tars)


def test_shards_without_index_are_parsed_and_resume(s3, dataset, reference):
    uri, _ = dataset
    bad_uri, prefix = _copy_dataset(s3, uri)
    s3.delete_object(Bucket="ganforge", Key=f"{prefix}/train-000001.idx")
    s3.put_object(Bucket="ganforge", Key=f"{prefix}/train-000004.idx", Body=b"v1.2 3\nnot an index\n")
    with ShardLoader(_cfg(bad_uri)) as loader:
        x, _ = _epoch(loader)
        assert loader.skipped == 0 and loader.checksum_errors == 0
    assert _counts(_to_uint8(x)) == _counts(reference[0])
    cfg = _cfg(bad_uri, hflip=True, shuffle_buffer=100, batch_size=50)
    with ShardLoader(cfg) as loader:
        order = [s.name for s in loader.order.shards(loader._entries, 0)]
        it = iter(loader)
        stop = order.index("train-000001.tar") * PER_SHARD + 250  # resuming re-reads from sample 200 of that shard
        for _ in range(stop // 50):
            next(it)
        state = loader.state_dict()
        expected = [next(it) for _ in range(5)]
    with ShardLoader(cfg) as resumed:
        resumed.load_state_dict(state)
        it = iter(resumed)
        for x, y in expected:
            rx, ry = next(it)
            assert torch.equal(rx, x) and torch.equal(ry, y)
