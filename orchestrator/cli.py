"""`ganforge` command line: the local stack, shards, training.

    ganforge up | down | status            local SeaweedFS S3 + MLflow + Ray head under .ganforge/
    ganforge shards --dataset fashion-mnist --out s3://ganforge/datasets/fashion-mnist
    ganforge train biggan [--config FILE] [key=value ...]

Bad input ends with one line on stderr naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

JOB_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _user_errors() -> tuple[type[Exception], ...]:
    from orchestrator.config import ConfigError
    from orchestrator.tracking.mlflow import TrackingError
    from orchestrator.train.checkpoint import CheckpointError

    return (ConfigError, CheckpointError, TrackingError, ValueError, FileNotFoundError)


def default_config(model: str) -> Path | None:
    path = JOB_CONFIGS / f"{model}.yaml"
    return path if path.exists() else None


def run_job(model: str, argv: list[str] | None = None) -> int:
    """Entry point shared by `jobs/<model>.py` and `ganforge train <model>`."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{model}.py",
        description=f"Train {model} with Ray Train. Overrides are section.key=value, e.g. train.steps=500.",
    )
    parser.add_argument("--config", help=f"YAML config (default: jobs/configs/{model}.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        from orchestrator.config import build_config

        cfg = build_config(model, args.config or default_config(model), args.overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return 0
        from orchestrator.train.trainer import fit

        outcome = fit(cfg)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"run              {outcome.name}  ({outcome.wall_s / 60:.1f} min)")
    print(f"MLflow run       {outcome.mlflow_url or '(tracking disabled)'}")
    print(f"checkpoints      {outcome.checkpoint_uri}")
    print(f"final samples    {outcome.grid_path}")
    losses = {k: round(v, 4) for k, v in outcome.metrics.items() if k.startswith("loss/")}
    print(f"last metrics     {losses}")
    return 0


def _stack(args):
    from orchestrator.stack import default_stack

    return default_stack(args.root)


def cmd_up(args) -> int:
    st = _stack(args)
    st.up()
    print("\nexport these to use the stack from another shell (the secret is the local default):")
    for k, v in st.client_environ().items():
        if k != "AWS_SECRET_ACCESS_KEY":
            print(f"  export {k}={v}")
    return 0


def cmd_down(args) -> int:
    _stack(args).down()
    return 0


def cmd_status(args) -> int:
    status = _stack(args).status()
    for name, s in status.items():
        state = "healthy" if s["healthy"] else ("running, not answering" if s["alive"] else "down")
        print(f"{name:7s} {state:24s} {s['url']}  pid={s['pid']}")
    return 0 if all(s["healthy"] for s in status.values()) else 1


def cmd_shards(args) -> int:
    from orchestrator.data.shards import write_shards

    manifest = write_shards(
        args.dataset,
        args.out,
        resolution=args.resolution,
        shard_size_mb=args.shard_size_mb,
        max_samples=args.max_samples,
    )
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards → {args.out.rstrip('/')}/")
    return 0


def cmd_train(args) -> int:
    return run_job(args.model, args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ganforge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".ganforge", help="local stack state/log/data folder")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the local stack (idempotent)").set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=cmd_down)
    sub.add_parser("status", help="health of the local stack").set_defaults(func=cmd_status)
    p = sub.add_parser("shards", help="write WebDataset shards + DALI indexes + manifest to S3")
    p.add_argument("--dataset", required=True, help="fashion-mnist, an image folder, or an s3:// WebDataset prefix")
    p.add_argument("--out", required=True, help="s3://bucket/prefix")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--shard-size-mb", type=float, default=256)
    p.add_argument("--max-samples", type=int, default=None)
    p.set_defaults(func=cmd_shards)
    p = sub.add_parser("train", help="train a model (same as python jobs/<model>.py)")
    p.add_argument("model", choices=["biggan", "stylegan2"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
