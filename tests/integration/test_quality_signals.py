"""Mode-collapse signals computed with the in-training metric, on the real stack (S3 shards, domain classifier stored
beside the dataset, Ray Train with 2 gloo workers).

Stand-in generators that return real Fashion-MNIST *test* images (never in the training shards) give signals whose
true values are known: a faithful one looks like fresh data, one that makes only 3 of the 10 classes loses recall,
coverage and accuracy in proportion, one that returns a single image for every latent has collapsed completely.
A tiny untrained BigGAN evaluated with ``fid`` by 2 Ray Train workers checks that every rank gets the identical
signals, that rank 0 trains the missing domain classifier, and that the real feature set is cached in S3 and reused.

Also runnable as a script (``python tests/integration/test_quality_signals.py DATASET OUT``): the 2-worker driver.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator.config import build_config
from orchestrator.data.writer import write_shards

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
N = 500  # generated samples and signal-set size of the in-process evaluations
BIGGAN_YAML = REPO / "jobs/configs/biggan.yaml"  # the demo model: 32², 10 classes
TINY_BIGGAN = ["model.ch=8", "model.dim_z=32", "model.shared_dim=16", "train.num_workers=2"]


class ImagePool:
    """A stand-in class-conditional generator: ``sample(z, c)`` returns real images of class ``class_map[c]``
    chosen by ``z``, so the signals' right answers are known. ``class_map`` None = the class asked for."""

    z_dim = 1
    c_dim = 10

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_map: list[int] | None = None) -> None:
        self.by_class = [images[labels == c] for c in range(self.c_dim)]
        self.class_map = class_map or list(range(self.c_dim))

    def latents(self, n: int, generator: torch.Generator, truncation: float | None = None) -> torch.Tensor:
        return torch.randint(0, 2**31 - 1, (n, 1), generator=generator)

    def sample(self, z: torch.Tensor, c: torch.Tensor | None, truncation: float | None = None) -> torch.Tensor:
        out = []
        for zi, ci in zip(z[:, 0].tolist(), c.tolist()):
            pool = self.by_class[self.class_map[ci]]
            out.append(pool[zi % len(pool)])
        return torch.stack(out)


def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's test split as the shards hold the training split: 32×32, [-1, 1], 3 channels."""
    from orchestrator.data import fashion_mnist

    images, labels = fashion_mnist.load("test")
    x = torch.from_numpy(fashion_mnist.pad_to_32(images[:3000])).float() / 127.5 - 1.0
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels[:3000])


test_images.__test__ = False  # a helper, not a test


def dataset_uri(n: int) -> str:
    uri = f"s3://ganforge/datasets/signals-{uuid.uuid4().hex[:6]}"
    write_shards("fashion-mnist", uri, max_samples=n, samples_per_shard=600, progress=False)
    return uri


def objects(s3, dataset: str, folder: str) -> list[dict]:
    prefix = dataset.split("/", 3)[3] + f"/{folder}/"
    return s3.list_objects_v2(Bucket="ganforge", Prefix=prefix).get("Contents", [])


@pytest.fixture(scope="module")
def pool():
    return test_images()


def evaluator(dataset: str, recipe, **train):
    from orchestrator.data import s3
    from orchestrator.env import Env
    from orchestrator.train.evaluation import Evaluator

    overrides = [
        f"data.dataset={dataset}",
        "train.metric=fd_classifier",
        f"train.metric_n={N}",
        "train.metric_ref_n=1200",
        f"train.pr_n={N}",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    cfg = build_config("biggan", overrides=overrides)
    env = Env.from_environ()
    manifest = s3.check_prefix(dataset, env)
    return Evaluator(
        cfg,
        recipe,
        rank=0,
        world=1,
        device=torch.device("cpu"),
        env=env,
        manifest=manifest,
        manifest_hash=manifest.hash,
    )


def test_signals_tell_fresh_data_from_partial_and_total_collapse(stack, s3, pool):
    from orchestrator.train.domain_classifier import ensure_classifier

    dataset = dataset_uri(2400)
    images, labels = pool
    ensure_classifier(dataset, progress=False)  # what the driver's preflight does for fd_classifier

    faithful = evaluator(dataset, ImagePool(images, labels))
    first = faithful.evaluate()
    value, real = first.value, first.signals
    # coverage comes from the metric's own network (logits from the features already computed); the first
    # evaluation cached the real feature set beside the statistics
    assert faithful.signals_skipped == {} and faithful.classifier() is faithful.extractor
    assert first.ref_cached is False and first.reference_note.startswith("computed in")
    assert len(objects(s3, dataset, "feature-stats")) == 1 and len(objects(s3, dataset, "feature-sets")) == 1
    assert math.isfinite(value) and value > 0
    assert {"precision", "recall", "diversity", "coverage", "accuracy"} <= set(real)
    assert {f"accuracy/class_{c}" for c in range(10)} <= set(real)
    # fresh real images: inside each other's manifolds, as varied as the data, every class recognised
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    assert real["diversity"] == pytest.approx(1.0, abs=0.15)
    assert real["coverage"] == 1.0 and real["accuracy"] > 0.6
    assert first.class_report["n"] == N

    # only trousers, sneakers and bags (shapes unlike the rest), whatever class is asked for
    three = evaluator(dataset, ImagePool(images, labels, class_map=[1, 1, 1, 1, 7, 7, 7, 7, 8, 8]))
    again = three.evaluate()
    part = again.signals
    assert (
        again.ref_cached is True and again.reference_note == "cached in S3"
    )  # statistics and feature set from S3 this time
    assert part["precision"] > 0.7  # still real images ...
    # ... of only 3 classes: much of the data is never made. Not 3/10 of the recall: k-NN balls around the
    # outermost generated points are wide and take in nearby classes (the metric's known outlier sensitivity)
    assert part["recall"] < real["recall"] - 0.25
    # a few misclassified samples spill into other classes; coverage stays below the default alarm (coverage<0.5)
    assert 0.3 <= part["coverage"] < 0.5 and part["accuracy"] < 0.5 * real["accuracy"]

    single = images[labels == 0][:1]
    collapsed = evaluator(dataset, ImagePool(single.expand(10, -1, -1, -1), torch.arange(10)))
    dead = collapsed.evaluate().signals
    assert dead["recall"] <= 1 / N and dead["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert dead["coverage"] == pytest.approx(0.1) and dead["accuracy"] <= 0.15
    for signals in (real, part, dead):
        assert all(0.0 <= v <= 1.0 for k, v in signals.items() if k != "diversity")

    off = evaluator(dataset, ImagePool(images, labels), quality_signals="false")
    plain = off.evaluate()
    assert (
        plain.value == value and plain.signals == {} and plain.class_report is None
    )  # the metric itself does not change


# ----------------------------------------------------------------------------------------- 2 Ray Train workers
def _eval_worker(config: dict) -> None:
    import ray.train

    import gan_models
    from orchestrator.config import JobConfig
    from orchestrator.data import s3
    from orchestrator.env import Env
    from orchestrator.train.evaluation import Evaluator

    torch.set_num_threads(1)
    cfg = JobConfig.from_dict(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)  # the same untrained weights on both ranks, as after DDP's broadcast
    recipe = gan_models.make_recipe(cfg.model_name, cfg.model, cfg.hparams)
    recipe.setup(torch.device("cpu"), lambda m: m)
    env = Env.from_environ()
    manifest = s3.check_prefix(cfg.data.dataset, env)

    def evaluate(ev: Evaluator) -> dict:
        result = ev.evaluate()
        return {
            "value": result.value,
            "signals": result.signals,
            "cached": result.ref_cached,
            "skipped": ev.signals_skipped,
        }

    kw = dict(
        rank=rank,
        world=world,
        device=torch.device("cpu"),
        env=env,
        manifest=manifest,
        manifest_hash=manifest.hash,
    )
    first = Evaluator(cfg, recipe, **kw)
    runs = [evaluate(first), evaluate(first), evaluate(Evaluator(cfg, recipe, **kw))]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(runs))


def _two_workers(dataset: str, out: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.env import Env
    from orchestrator.train.trainer import connect_ray

    # fid: the Inception features (2048-d) and a domain classifier that only the signals need, so rank 0 trains it
    cfg = build_config(
        "biggan",
        BIGGAN_YAML,
        [
            f"data.dataset={dataset}",
            "train.metric=fid",
            "train.metric_n=65",
            "train.metric_ref_n=64",
            "train.pr_n=48",
            *TINY_BIGGAN,
        ],
    )
    connect_ray(cfg, Env.from_environ())
    TorchTrainer(
        _eval_worker,
        train_loop_config={"job": cfg.to_dict(), "out": out},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"signals-{uuid.uuid4().hex[:6]}", storage_path=out),
    ).fit()


def test_two_workers_get_identical_signals_and_reuse_the_cached_feature_set(stack, s3, tmp_path):
    dataset = dataset_uri(1200)  # a fresh dataset: rank 0 trains its classifier, rank 1 loads it
    env = {**os.environ, "RAY_ADDRESS": stack.ray_gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, __file__, dataset, str(tmp_path)],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # metric, signals, cache state: identical on every rank
    first, again, fresh = ranks[0]
    assert first["skipped"] == {}
    prefix = dataset.split("/", 3)[3]
    assert s3.head_object(Bucket="ganforge", Key=f"{prefix}/classifier.pt")["ContentLength"] > 10_000
    assert set(first["signals"]) >= {"precision", "recall", "diversity", "coverage", "accuracy"}
    assert all(0.0 <= v <= 1.0 for k, v in first["signals"].items() if k != "diversity")
    assert math.isfinite(first["signals"]["diversity"]) and first["signals"]["diversity"] > 0
    # an untrained G: its blobs are far from garments, and the classifier does not see the asked-for classes
    assert first["signals"]["precision"] < 0.5 and first["signals"]["accuracy"] < 0.5
    # fixed latents, unchanged weights: a second evaluation and a fresh evaluator (reading S3) agree exactly
    assert (first["cached"], again["cached"], fresh["cached"]) == (False, False, True)
    assert again["value"] == first["value"] and again["signals"] == first["signals"]
    assert fresh["value"] == first["value"] and fresh["signals"] == first["signals"]
    (real_set,) = objects(s3, dataset, "feature-sets")
    body = s3.get_object(Bucket="ganforge", Key=real_set["Key"])["Body"].read()
    from orchestrator.train.evaluation import features_from_bytes

    assert features_from_bytes(body).shape == (48, 2048)  # pr_n real Inception features


if __name__ == "__main__":
    _two_workers(sys.argv[1], sys.argv[2])
