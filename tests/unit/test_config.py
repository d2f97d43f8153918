"""Config: defaults, YAML, key=value overrides, one-line errors."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, JobConfig, build_config
from orchestrator.env import Env, split_s3_uri
from orchestrator.tune.sweep import load_sweep_config


def test_defaults_and_overrides_are_typed():
    cfg = build_config(
        "biggan",
        overrides=[
            "model.resolution=64",
            "hparams.g_lr=1e-3",
            "train.amp=false",
            "hparams.betas=0.5,0.9",
            "data.hflip=0",
        ],
    )
    assert cfg.model.resolution == 64 and cfg.model.ch == 64  # BigGAN-PyTorch's default ch at 64²
    assert cfg.hparams.g_lr == 1e-3 and isinstance(cfg.hparams.g_lr, float)
    assert cfg.train.amp is False and cfg.data.hflip is False
    assert cfg.hparams.betas == (0.5, 0.9)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {resolution: 32, ch: 8}\ntrain: {steps: 7, num_workers: 3}\n")
    cfg = build_config("biggan", path, ["train.steps=9"])
    assert (cfg.model.ch, cfg.train.steps, cfg.train.num_workers) == (8, 9, 3)


def test_round_trip_through_dict():
    cfg = build_config("biggan", overrides=["model.resolution=32", "model.ch=8", "train.name=x"])
    again = JobConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.flat()["model.ch"] == 8 and cfg.flat()["train.name"] == "x"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=1"], "unknown config key 'train.stepz'; valid train keys: accumulate, amp,"),
        (["nosection.x=1"], "unknown config key 'nosection.x'"),
        (["train.steps"], "is not key=value"),
        (["train.steps=abc"], "train.steps='abc' is not an integer"),
        (["train.steps=1.5"], "is not an integer"),
        (["train.amp=maybe"], "is not a boolean"),
        (["train.use_gpu=sometimes"], "train.use_gpu='sometimes' is invalid; expected auto, true or false"),
        (["data.dataset=/local/path"], "expected an s3://bucket/prefix URI"),
        (["data.crop_scale=0"], "data.crop_scale=0.0 is invalid; expected an area fraction in (0, 1]; 1 = no crop"),
        (["model.resolution=48"], "resolution 48 not supported; valid: 32, 64, 128, 256, 512"),
    ],
)
def test_bad_input_is_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config("biggan", overrides=overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sweep_overrides_parse_like_job_overrides():
    sweep = load_sweep_config(None, ["sweep.lrs=1e-4,1e-3", "sweep.num_workers=3", "sweep.name=true", "train.steps=9"])
    assert (sweep.lrs, sweep.num_workers, sweep.name, sweep.overrides) == ([1e-4, 1e-3], 3, "true", ["train.steps=9"])
    for item, message in [
        ("sweep.num_workers=1.5", "sweep.num_workers=1.5 is not an integer"),
        ("sweep.lrs", "override 'sweep.lrs' is not key=value"),
        ("sweep.lr=1", "unknown sweep key sweep.lr; valid sweep keys: batch_sizes,"),
        ("sweep.search=bayes", "sweep.search='bayes' is invalid; expected grid or random"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_sweep_config(None, [item])
        assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_and_missing_file():
    with pytest.raises(ConfigError, match="unknown model 'dcgan'; valid: biggan, stylegan2"):
        build_config("dcgan")
    with pytest.raises(ConfigError, match="not found"):
        build_config("biggan", "/no/such.yaml")


def test_env_defaults_and_secret_not_in_repr():
    env = Env.from_environ({"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ENDPOINT_URL_S3": "http://h:1"})
    assert env.s3_endpoint == "http://h:1" and env.mlflow_uri == "http://127.0.0.1:5000"
    assert "s3cr3t" not in repr(env)
    aws = Env.from_environ({"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "x"})
    assert aws.s3_endpoint is None  # real AWS: botocore picks the endpoint
    irsa = Env.from_environ({"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token", "AWS_ROLE_ARN": "arn"})
    assert irsa.s3_endpoint is None and irsa.access_key is None and irsa.secret_key is None  # boto3's chain
    assert Env.from_environ({}).access_key == "ganforge"  # nothing set: the local stack
    assert split_s3_uri("s3://b/p/q") == ("b", "p/q")
    with pytest.raises(ValueError, match="not an S3 URI"):
        split_s3_uri("/tmp/x")
