"""Session fixtures: the real local stack (SeaweedFS S3, MLflow server, Ray head) on free loopback ports."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from orchestrator.env import Env
from orchestrator.stack import LocalStack, Ports

LOCAL_SECRET = "test-secret-" + os.urandom(6).hex()


@pytest.fixture(scope="session")
def stack():
    """The whole local stack, started once per test session and torn down at the end.

    Its client environment (AWS_*, MLFLOW_TRACKING_URI, RAY_ADDRESS) is exported for the session so code under test
    finds it exactly as it would find a real cluster's services.
    """
    root = Path(tempfile.mkdtemp(prefix="gf-stack-"))
    env = Env.from_environ(
        {"AWS_ACCESS_KEY_ID": "ganforge-test", "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET, "GANFORGE_BUCKET": "ganforge"}
    )
    try:
        with LocalStack(root=root, env=env, ports=Ports.free(), num_cpus=4).running() as st:
            yield st
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3(stack):
    """A boto3 client on the stack's S3 with the test credentials."""
    return stack.s3_client()
