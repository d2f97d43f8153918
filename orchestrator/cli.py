"""`ganforge` command line: the local stack, shards, training.

    ganforge up | down | status            local SeaweedFS S3 + MLflow + Ray head under .ganforge/
    ganforge shards --dataset fashion-mnist --out s3://ganforge/datasets/fashion-mnist
    ganforge train biggan [--config FILE] [key=value ...]
    ganforge sample models:/biggan@champion --n 64 --seed 0 --out grid.png   (or models:/biggan/3, a checkpoint)
    ganforge sample models:/biggan@champion --n 100000 --to s3://ganforge/synthetic/biggan   (a synthetic dataset)
    ganforge models list | show NAME | register RUN_ID_OR_NAME
    ganforge sweep [--config jobs/configs/tune_sweep.yaml] [sweep.key=value | section.key=value ...]
    ganforge classifier --dataset s3://ganforge/datasets/fashion-mnist
    ganforge report RUN_ID_OR_NAME [--experiment NAME] [--out DIR]   (training-health report of a run)

Bad input ends with one line on stderr naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback


def _user_errors() -> tuple[type[Exception], ...]:
    from orchestrator.config import ConfigError
    from orchestrator.tracking.mlflow import TrackingError
    from orchestrator.train.checkpoint import CheckpointError
    from orchestrator.train.health import TrainingStopped

    return (ConfigError, CheckpointError, TrackingError, TrainingStopped, ValueError, FileNotFoundError)


def report_error(e: Exception) -> int:
    """One line for the user; the traceback too when GANFORGE_DEBUG is set."""
    if os.environ.get("GANFORGE_DEBUG"):
        traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return 2


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
        from orchestrator.config import build_config, default_config

        cfg = build_config(model, args.config or default_config(model), args.overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return 0
        from orchestrator.train.trainer import fit

        outcome = fit(cfg)
    except _user_errors() as e:
        return report_error(e)
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
    from orchestrator.data.writer import write_shards

    manifest = write_shards(
        args.dataset,
        args.out,
        resolution=args.resolution,
        shard_size_mb=args.shard_size_mb,
        max_samples=args.max_samples,
    )
    print(f"{manifest.num_samples} samples in {len(manifest.shards)} shards → {args.out.rstrip('/')}/")
    return 0


def cmd_train(args) -> int:
    return run_job(args.model, args.rest)


# --- model registry + sampling (orchestrator/tracking/registry.py, orchestrator/sample.py) ---------------------------


def cmd_sample(args) -> int:
    if args.to is None:
        from orchestrator.sample import sample_grid

        sample_grid(
            args.source,
            args.out or "samples.png",
            n=args.n,
            seed=args.seed,
            truncation=args.truncation,
            class_=args.class_,
            scale=args.scale,
        )
        return 0
    from orchestrator.export import export_synthetic

    if args.out is not None:
        raise ValueError(f"--out {args.out!r} writes a grid and --to {args.to!r} a dataset; give one of them")
    export_synthetic(
        args.source,
        args.to,
        n=args.n,
        seed=args.seed,
        truncation=args.truncation,
        class_=args.class_,
        samples_per_shard=args.shard_size,
        image_format=args.format,
        overwrite=args.overwrite,
        device=args.device,
    )
    return 0


def cmd_models(args) -> int:
    from orchestrator.tracking import registry

    if args.models_command == "list":
        return registry.list_models()
    if args.models_command == "show":
        return registry.show_model(args.name)
    registry.register_run(args.run, model_name=args.model_name or None)
    return 0


def add_registry_commands(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="a seeded grid of samples, or with --to a synthetic dataset, from a registered model or a checkpoint",
    )
    p.add_argument("source", help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint dir or s3://…/checkpoint_…")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="latent seed: the same seed gives the same PNG; with --to, sample i uses seed + i",
    )
    p.add_argument("--truncation", type=float, default=None, help="truncation (BigGAN: |z| bound, StyleGAN2: psi)")
    p.add_argument(
        "--class",
        dest="class_",
        type=int,
        default=None,
        help="one class for all (default: grid row r → class r; with --to, balanced)",
    )
    p.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of the grid")
    p.add_argument("--out", default=None, help="grid PNG path (default samples.png)")
    g = p.add_argument_group("synthetic dataset (--to)")
    g.add_argument(
        "--to",
        default=None,
        help="s3://bucket/prefix: write WebDataset shards + manifest there instead of a grid; re-running resumes",
    )
    g.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    g.add_argument("--format", default="png", choices=["png", "jpg"], help="image encoding (default png, lossless)")
    g.add_argument("--overwrite", action="store_true", help="replace a different dataset already under --to")
    g.add_argument("--device", default="cpu", help="torch device generating the images (default cpu)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("models", help="the MLflow model registry: list, show, register")
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="registered models with their champion and challenger").set_defaults(func=cmd_models)
    q = msub.add_parser("show", help="versions of a model: aliases, FID, dataset, source runs")
    q.add_argument("name")
    q.set_defaults(func=cmd_models)
    q = msub.add_parser("register", help="register a finished run's G_ema (champion if its FID is best)")
    q.add_argument("run", help="MLflow run id or ganforge run name")
    q.add_argument("--model-name", default="", help="registered model name (default: the run's model kind)")
    q.set_defaults(func=cmd_models)


# --- sweeps and the domain classifier (orchestrator/tune/, orchestrator/metrics/classifier.py) ---------------------


def run_sweep_cli(argv: list[str] | None = None) -> int:
    """Entry point shared by `jobs/tune_sweep.py` and `ganforge sweep`."""
    parser = argparse.ArgumentParser(prog="ganforge sweep", description="Ray Tune lr × batch-size sweep with ASHA.")
    parser.add_argument("--config", help="sweep YAML (default: jobs/configs/tune_sweep.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved sweep config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        from orchestrator.config import JOB_CONFIGS
        from orchestrator.tune.sweep import load_sweep_config, run_sweep

        sweep = load_sweep_config(args.config or str(JOB_CONFIGS / "tune_sweep.yaml"), args.overrides)
        sweep.job()  # the base job config must be valid too
        if args.print_config:
            print(json.dumps(dataclasses.asdict(sweep), indent=2, default=str))
            return 0
        outcome = run_sweep(sweep)
    except _user_errors() as e:
        return report_error(e)
    print(f"MLflow sweep run {outcome.parent_run_url or '(tracking disabled)'}")
    return 0


def cmd_sweep(args) -> int:
    return run_sweep_cli(args.rest)


def cmd_classifier(args) -> int:
    from orchestrator.train.domain_classifier import ensure_classifier

    _, info = ensure_classifier(args.dataset)
    print(f"domain classifier for {args.dataset}: hold-out accuracy {info['holdout_accuracy']:.3f}")
    return 0


def add_sweep_commands(sub) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over lr × batch size (same as python jobs/tune_sweep.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("classifier", help="train (once) the domain classifier behind the fd_classifier metric")
    p.add_argument("--dataset", required=True, help="s3://bucket/prefix of the dataset's shards")
    p.set_defaults(func=cmd_classifier)


# --- training-health report (orchestrator/report.py) ----------------------------------------------------------------


def cmd_report(args) -> int:
    from orchestrator.report import health_report

    report = health_report(args.run, experiment=args.experiment, out_dir=args.out)
    print(report.markdown.rstrip())
    print()
    if report.rebuilt:
        print("(rebuilt from the run's MLflow metric history: it logged no health report artifacts)")
    print(f"report           {report.markdown_path}")
    print(f"plot             {report.plot_path}")
    return 0


def add_report_command(sub) -> None:
    p = sub.add_parser("report", help="a run's training-health report (markdown + plot) from MLflow")
    p.add_argument("run", help="MLflow run id or ganforge run name (train.name)")
    p.add_argument("--experiment", default=None, help="look only in this MLflow experiment (default: all)")
    p.add_argument("--out", default=None, help="folder for report.md + health.png (default outputs/<run>/health)")
    p.set_defaults(func=cmd_report)


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
    add_registry_commands(sub)
    add_sweep_commands(sub)
    add_report_command(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        return report_error(e)


if __name__ == "__main__":
    sys.exit(main())
