"""The GPU decode path's pure logic, checked without a GPU or the stack: decoder arguments and backend, the executor,
which DALI failures count as a bad image, the bound on re-sending a batch, and the FID reference key's decoder."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nvidia.dali import types as dali_types
from PIL import Image

from orchestrator.config import DataConfig, build_config
from orchestrator.data import loader as loader_mod
from orchestrator.data.loader import ShardLoader
from orchestrator.data.manifest import Manifest
from orchestrator.data.s3 import DataError
from orchestrator.data.stream import Batches, Order
from orchestrator.metrics.fid import reference_key
from orchestrator.train import evaluation as ev

# What DALI 2.4 raised in tests/integration/test_data_s3.py::test_image_only_the_decoder_rejects_is_skipped
DALI_DECODE_ERROR = (
    "Critical error in pipeline:\nCritical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n"
    "which was used in the pipeline definition with the following traceback:\n\n"
    '  File "/work/main/orchestrator/data/loader.py", line 478, in pipe\n'
    '    images = fn.decoders.image(data, device="mixed" if use_gpu else "cpu",\n\n'
    "encountered:\n\nFailed to decode sample #16 : \n"
    "Current pipeline object is no longer valid.\nCurrent pipeline object is no longer valid."
)


def test_gpu_decoder_upsamples_jpeg_chroma_like_the_cpu_one():
    gpu, cpu = loader_mod.decoder_args(True, 3), loader_mod.decoder_args(False, 3)
    assert gpu == {"device": "mixed", "output_type": dali_types.RGB, "jpeg_fancy_upsampling": True}
    assert cpu["device"] == "cpu" and cpu["output_type"] == gpu["output_type"]
    assert loader_mod.decoder_args(True, 1)["output_type"] == loader_mod.decoder_args(False, 1)["output_type"]
    assert loader_mod.decoder_args(False, 1)["output_type"] == dali_types.GRAY


def test_decode_backend_is_mixed_only_on_an_available_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader_mod.decode_backend(torch.device("cpu")) == "cpu"
    assert loader_mod.decode_backend(torch.device("cuda")) == "cpu"  # no CUDA: the loader falls back
    assert loader_mod.decode_backend(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader_mod.decode_backend(torch.device("cuda")) == "mixed"
    assert loader_mod.decode_backend("cuda:1") == "mixed"
    assert loader_mod.decode_backend(torch.device("cpu")) == "cpu"


def _build(monkeypatch, use_gpu: bool) -> dict:
    """What ``_build_pipeline`` asks of DALI (executor, decoder arguments), with DALI's ``fn`` and
    ``pipeline_def`` replaced by recorders so the GPU branch runs without a GPU."""
    asked: dict = {}

    class Fn:
        class decoders:
            @staticmethod
            def image(data, **kw):
                asked["decoder"] = kw
                return "images"

        @staticmethod
        def external_source(**kw):
            return ["node"] * kw["num_outputs"]

        @staticmethod
        def resize(images, **kw):
            return images

        @staticmethod
        def crop_mirror_normalize(images, **kw):
            return images

    def pipeline_def(**kw):
        asked["executor"] = kw

        def wrap(body):
            def make(**pipe_kw):
                asked["pipe"] = pipe_kw
                body()
                return SimpleNamespace(build=lambda: None)

            return make

        return wrap

    monkeypatch.setattr(loader_mod, "fn", Fn)
    monkeypatch.setattr(loader_mod, "pipeline_def", pipeline_def)
    loader = object.__new__(ShardLoader)
    loader.cfg, loader.rank, loader.resolution, loader.channels, loader._crop = DataConfig(), 0, 32, 3, False
    loader.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    loader._build_pipeline(0, 1, use_gpu)
    return asked


@pytest.mark.parametrize("use_gpu", [True, False])
def test_both_backends_build_the_same_executor_and_the_gpu_decodes_like_the_cpu(monkeypatch, use_gpu):
    asked = _build(monkeypatch, use_gpu)
    assert asked["executor"]["exec_dynamic"] is True  # the executor the decode-error recovery is tested with
    assert asked["decoder"] == loader_mod.decoder_args(use_gpu, 3)
    assert asked["decoder"].get("jpeg_fancy_upsampling", False) is use_gpu
    assert asked["pipe"]["device_id"] == (0 if use_gpu else None)


def test_only_image_failures_count_as_decode_errors():
    assert loader_mod.is_decode_error(RuntimeError(DALI_DECODE_ERROR))
    assert loader_mod.is_decode_error(RuntimeError(DALI_DECODE_ERROR.replace("CPU operator", "MIXED operator")))
    oom = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139.8 GiB total capacity)"
    assert not loader_mod.is_decode_error(torch.OutOfMemoryError(oom))
    in_decoder = DALI_DECODE_ERROR.split("encountered:")[0] + "encountered:\n\n"
    for device_failure in (
        "nvImageCodec failed: cudaErrorMemoryAllocation",
        "CUDA error: an illegal memory access",
        "CUDA_ERROR_OUT_OF_MEMORY",
        "Failed to decode sample #3 : out of memory",
    ):
        assert not loader_mod.is_decode_error(RuntimeError(in_decoder + device_failure)), device_failure
        assert not loader_mod.is_decode_error(RuntimeError(f"... {device_failure} ..."))
    other_op = "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.crop_mirror_normalize`"
    assert not loader_mod.is_decode_error(RuntimeError(other_op))
    assert not loader_mod.is_decode_error(ValueError("Failed to decode sample #1"))


# ------------------------------------------------------------------------------------- __iter__ with a fake DALI
def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _batch(pos: int, images: list[bytes]) -> tuple:
    """A ``Batches.pending`` entry: (position after, skipped, kept samples with their augmentation rows)."""
    kept = [((np.frombuffer(data, np.uint8), i, False), [0.0, 0.0, 0.0, 1.0, 1.0]) for i, data in enumerate(images)]
    return (0, pos), 0, kept


class _FailingDali:
    """A DALI iterator that raises ``exc`` on every batch. With ``refill``, each call first hands DALI a new batch,
    as the real pipeline's source does: batch ``k`` is ``refill(k)``. Stops the test after ``limit`` calls."""

    def __init__(self, loader, exc, refill=None, limit=50):
        self.loader, self.exc, self.refill, self.limit, self.calls = loader, exc, refill, limit, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls > self.limit:
            raise AssertionError(f"still retrying after {self.limit} failures")
        if self.refill is not None:
            self.loader._batches.pending.append(self.refill(self.calls))
        raise self.exc


def _loader(pending: list) -> ShardLoader:
    loader = object.__new__(ShardLoader)
    loader.channels, loader.device, loader.skipped, loader._started = 3, torch.device("cpu"), 0, False
    loader._turn, loader._reader = 0, SimpleNamespace(failure=None)
    order = Order(seed=0, rank=0, window=1, hflip=False, crop_scale=1.0)
    loader._batches = Batches(
        loader._reader, order, batch_size=3, epoch_size=1000, epoch=0, pos=0, on_skip=loader._skip
    )
    loader._batches.pending.extend(pending)
    return loader


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("Error in MIXED operator `nvidia.dali.fn.decoders.image` ... cudaErrorMemoryAllocation"),
    ],
)
def test_out_of_memory_is_raised_not_treated_as_a_bad_image(exc):
    loader = _loader([_batch(50, [_png()] * 3), _batch(100, [_png()] * 3)])
    loader._iters = [_FailingDali(loader, exc)]
    with pytest.raises(type(exc)) as raised:
        next(iter(loader))
    assert raised.value is exc
    assert len(loader._batches.pending) == 2 and loader.skipped == 0  # nothing dropped or re-sent


def test_decode_error_without_a_batch_in_flight_is_a_data_error():
    loader = _loader([])
    loader._iters = [_FailingDali(loader, RuntimeError(DALI_DECODE_ERROR))]
    with pytest.raises(DataError, match=r"no batch in flight: Failed to decode sample #16 :$"):
        next(iter(loader))


def test_retries_are_bounded_when_dali_rejects_images_pil_decodes():
    """Failures that find a bad image make progress and may follow each other without end (a dataset with many bad
    webp images); failures that find none are re-sent at most (batches in flight + 1) times in a row."""
    bad = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20  # PIL cannot open it

    def refill(k):  # DALI takes a new batch per call: 6 with a bad image, then only images PIL decodes
        return _batch(50 * (k + 2), [_png(), bad if k <= 6 else _png(), _png()])

    loader = _loader([_batch(50, [_png(), bad, _png()]), _batch(100, [_png()] * 3)])
    loader._iters = [dali := _FailingDali(loader, RuntimeError(DALI_DECODE_ERROR), refill)]
    with pytest.raises(DataError, match=r"^DALI failed 5 times in a row .*\(Failed to decode sample #16 :\)"):
        next(iter(loader))
    assert loader.skipped == 1 + 6  # the first batch's bad image, then the refills'
    # failures blame, in turn: the two first batches, refills 1-6 (bad), then 5 fruitless ones, 3 in flight: 5 > 3 + 1
    assert dali.calls == 2 + 6 + 5


# ------------------------------------------------------------------------------------- FID reference key
def test_reference_key_names_the_decoder(monkeypatch):
    monkeypatch.setattr(ev, "make_extractor", lambda *a, **k: SimpleNamespace(name="inception", weights_id="w1"))
    cfg = build_config("biggan")
    manifest = Manifest("fashion-mnist", 32, 1, tuple(str(c) for c in range(10)), 4000, "png", ())

    def key_parts(device):
        return ev.Evaluator(
            cfg, None, rank=0, world=1, device=device, env=None, manifest=manifest, manifest_hash="h"
        ).key_parts

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu, fallback = key_parts(torch.device("cpu")), key_parts(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = key_parts(torch.device("cuda"))
    assert cpu["decoder"] == fallback["decoder"] == "cpu" and gpu["decoder"] == "mixed"
    assert reference_key(cpu) == reference_key(fallback) != reference_key(gpu)
