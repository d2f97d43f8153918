"""Where the services are, read from the environment variables a real cluster uses.

Nothing here assumes the local stack: pointing these variables at AWS S3, a hosted MLflow and a KubeRay cluster is the
whole migration. Defaults match ``ganforge up``. Secrets live only here and are never put into configs, params or logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

LOCAL_S3 = "http://127.0.0.1:8333"
LOCAL_MLFLOW = "http://127.0.0.1:5000"
LOCAL_RAY = "http://127.0.0.1:8265"
LOCAL_ACCESS_KEY = "ganforge"
LOCAL_SECRET_KEY = "ganforge-local-secret"  # only ever valid against the loopback-only local stack
DEFAULT_BUCKET = "ganforge"
_AWS_CREDENTIAL_SOURCES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@dataclass(frozen=True)
class Env:
    s3_endpoint: str | None  # None = AWS's own endpoints
    access_key: str | None
    secret_key: str | None = field(repr=False)
    region: str
    bucket: str
    mlflow_uri: str
    ray_address: str

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> Env:
        e = os.environ if environ is None else environ
        endpoint = e.get("GANFORGE_S3_ENDPOINT") or e.get("AWS_ENDPOINT_URL_S3") or e.get("AWS_ENDPOINT_URL")
        # No endpoint but some AWS credential source (keys, profile, IRSA, ECS role) means AWS S3 itself, with
        # boto3's credential chain; neither means the local stack. GANFORGE_S3_ENDPOINT=aws forces AWS.
        on_aws = endpoint == "aws" or (endpoint is None and any(k in e for k in _AWS_CREDENTIAL_SOURCES))
        local = endpoint is None and not on_aws
        return cls(
            s3_endpoint=None if on_aws else (endpoint or LOCAL_S3),
            access_key=e.get("AWS_ACCESS_KEY_ID", LOCAL_ACCESS_KEY if local else None),
            secret_key=e.get("AWS_SECRET_ACCESS_KEY", LOCAL_SECRET_KEY if local else None),
            region=e.get("AWS_DEFAULT_REGION") or e.get("AWS_REGION") or "us-east-1",
            bucket=e.get("GANFORGE_BUCKET", DEFAULT_BUCKET),
            mlflow_uri=e.get("MLFLOW_TRACKING_URI", LOCAL_MLFLOW),
            ray_address=e.get("RAY_ADDRESS", LOCAL_RAY),
        )

    def worker_environ(self) -> dict[str, str]:
        """Variables every Ray worker needs to reach S3 and MLflow (passed through ``runtime_env``)."""
        env = {
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "GANFORGE_BUCKET": self.bucket,
        }
        if self.s3_endpoint:
            env["GANFORGE_S3_ENDPOINT"] = self.s3_endpoint
            env["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint
        if self.access_key:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
        if self.secret_key:
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); a clear error for anything else."""
    p = urlparse(uri)
    if p.scheme != "s3" or not p.netloc:
        raise ValueError(f"not an S3 URI: {uri!r}; expected s3://<bucket>/<prefix>")
    return p.netloc, p.path.lstrip("/")
