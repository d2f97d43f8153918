"""S3 access for the data plane: one boto3 client per process, clear errors, resumable streaming reads.

botocore does the retrying of individual requests (adaptive mode); what it cannot retry is a response body that
breaks half-way (S3 restarted, connection reset), so :class:`ObjectStream` re-opens the object with a ranged GET from
a byte offset the caller knows is a clean restart point.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import boto3
import botocore.exceptions
import urllib3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from orchestrator.data.errors import DataError
from orchestrator.data.manifest import MANIFEST, Manifest
from orchestrator.env import Env, split_s3_uri

log = logging.getLogger(__name__)

_CREDENTIAL_ERRORS = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403", "InvalidToken"}
# What a restarted or unreachable S3 looks like mid-read: worth re-opening the body (botocore already retried the call).
STREAM_ERRORS = (
    botocore.exceptions.ConnectionError,  # endpoint refused/closed, read/connect timeouts
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _env(env: Env | None) -> Env:
    return env or Env.from_environ()


@functools.lru_cache(maxsize=8)
def _client(pid: int, env: Env, fail_fast: bool, checksums: bool):
    del pid  # only part of the cache key: boto3 clients must not be shared across fork
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s IMDS probe off EC2
    if fail_fast:  # a pre-flight check should answer in seconds, not retry for a minute
        cfg = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=3, read_timeout=10)
    else:
        cfg = Config(
            retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=5, read_timeout=60, max_pool_connections=32
        )
    if not checksums:
        cfg = cfg.merge(Config(response_checksum_validation="when_required"))
    return boto3.session.Session().client(
        "s3",
        endpoint_url=env.s3_endpoint,
        aws_access_key_id=env.access_key,
        aws_secret_access_key=env.secret_key,
        region_name=env.region,
        config=cfg,
    )


def client(env: Env | None = None, *, fail_fast: bool = False, checksums: bool = True):
    """The process's boto3 S3 client for ``env`` (default: from the environment), created once. ``checksums=False``:
    botocore does not check its CRC of whole-object GETs, for callers that check a stronger hash themselves."""
    return _client(os.getpid(), _env(env), fail_fast, checksums)


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def is_missing(e: ClientError) -> bool:
    """Whether S3 answered "no such object" (the code differs between GET, HEAD and S3 implementations)."""
    return error_code(e) in _MISSING


def normalise_prefix(prefix: str) -> str:
    """A key prefix as keys are built from it: ``"a/b/"``, or ``""`` for the bucket's root."""
    return prefix.rstrip("/") + "/" if prefix.strip("/") else ""


def split_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b/")``: the bucket and the normalised key prefix under it."""
    bucket, prefix = split_s3_uri(uri)
    return bucket, normalise_prefix(prefix)


def join_uri(uri: str, name: str) -> str:
    """The URI of object ``name`` under the prefix ``uri``."""
    return f"{uri.rstrip('/')}/{name}"


def describe_error(e: Exception, env: Env, what: str) -> str:
    """One line saying what went wrong with an S3 call, never including the secret."""
    endpoint = env.s3_endpoint or "AWS S3"
    if isinstance(e, ClientError):
        code = error_code(e)
        if code in _CREDENTIAL_ERRORS:
            return (
                f"S3 rejected the credentials for {endpoint} (access key {env.access_key}): "
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        if code == "NoSuchBucket":
            bucket = e.response.get("Error", {}).get("BucketName") or what.split("/")[2]
            return f"bucket {bucket!r} does not exist on {endpoint}; create it or fix the s3:// URI"
        return f"S3 error {code} reading {what} from {endpoint}: {e.response.get('Error', {}).get('Message', '')}"
    if isinstance(e, EndpointConnectionError | ConnectionError) or "Connect" in type(e).__name__:
        return f"cannot reach S3 at {endpoint} ({type(e).__name__}); is it running? (`ganforge up` for the local one)"
    return f"S3 request for {what} on {endpoint} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check_prefix(uri: str, env: Env | None = None) -> Manifest:
    """The :class:`Manifest` under ``uri``, or a one-line :class:`DataError` saying why it cannot be read."""
    env = _env(env)
    try:
        bucket, prefix = split_prefix(uri)
    except ValueError as e:
        raise DataError(str(e)) from None
    manifest = find_manifest(bucket, prefix, env, fail_fast=True)
    if manifest is None:
        raise DataError(f"no manifest.json under {uri}; write shards with `ganforge shards --dataset ... --out {uri}`")
    return manifest


def find_manifest(bucket: str, prefix: str, env: Env, *, fail_fast: bool = False) -> Manifest | None:
    """The manifest under the normalised ``prefix``, or None when there is none. A manifest that is there but
    unreadable raises :class:`~orchestrator.data.manifest.ManifestError`; S3 failures a :class:`DataError`."""
    uri = f"s3://{bucket}/{prefix}{MANIFEST}"
    try:
        body = client(env, fail_fast=fail_fast).get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read()
    except ClientError as e:
        if is_missing(e):
            return None
        raise DataError(describe_error(e, env, uri)) from None
    except (BotoCoreError, OSError) as e:
        raise DataError(describe_error(e, env, uri)) from None
    return Manifest.from_json(body, uri)


class ObjectStream:
    """A readable file object over an S3 object that survives broken connections.

    ``read`` resumes transparently with a ranged GET when the body breaks, so callers see one continuous byte
    stream. Safe because S3 objects are immutable while we read them (a changed object is caught by the sha256
    the caller computes over the stream).
    """

    def __init__(
        self, bucket: str, key: str, *, start: int = 0, env: Env | None = None, retry_for_s: float = 120, checksums=True
    ):
        self.bucket, self.key, self.env, self.checksums = bucket, key, _env(env), checksums
        self.pos = start  # absolute offset of the next byte read returns
        self.retry_for_s = retry_for_s
        self.reopens = 0
        self._body = None

    def _open(self):
        kw = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        s3 = client(self.env, checksums=self.checksums)
        self._body = s3.get_object(Bucket=self.bucket, Key=self.key, **kw)["Body"]

    def read(self, n: int = -1) -> bytes:
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            try:
                if self._body is None:
                    self._open()
                data = self._body.read(n if n is not None and n >= 0 else None)
                self.pos += len(data)
                return data
            except ClientError as e:
                if error_code(e) == "InvalidRange":  # asked to resume exactly at the end: nothing left
                    return b""
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status < 500 or time.monotonic() > deadline:  # 5xx: a restarting server, worth retrying
                    raise
                err = e
            except STREAM_ERRORS as e:
                if time.monotonic() > deadline:
                    raise
                err = e
            self.close()
            name = type(err).__name__
            log.warning("s3://%s/%s: %s at byte %d; re-opening in %.1f s", self.bucket, self.key, name, self.pos, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            self.reopens += 1

    def close(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # a broken socket may fail to close; it is dropped anyway
                self._body.close()
            self._body = None


class S3BytesStore:
    """A tiny get/put byte store on ``s3://bucket/prefix/`` (e.g. the reference-statistics cache of
    ``orchestrator.metrics.fid.cached_reference_stats``). ``get`` returns None for a missing key."""

    def __init__(self, bucket: str, prefix: str = "", env: Env | None = None) -> None:
        self.bucket, self.prefix, self.env = bucket, normalise_prefix(prefix.lstrip("/")), env

    def _key(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str) -> bytes | None:
        try:
            return client(self.env).get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if is_missing(e):
                return None
            raise

    def put(self, key: str, data: bytes) -> None:
        client(self.env).put_object(Bucket=self.bucket, Key=self._key(key), Body=data)  # S3 PUTs are atomic
