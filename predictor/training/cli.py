"""`python -m predictor.training` / `fraud-train` / `scripts/train.py`: one training run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from predictor.data import InvalidDataset
from predictor.report import parse_day_or_time
from predictor.training.config import TrainingConfig
from predictor.training.register import ensure_demo_model, mlflow_destination, train_and_register


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(
        prog="train",
        description=(
            "Train the fraud model on synthetic (or your CSV) transactions, log it to MLflow, "
            "register it and move the alias if it beats the current holder. MLflow location: "
            "MLFLOW_TRACKING_URI, or the embedded local store (LOCAL_STORE_DIR) when unset."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=defaults.rows, help="synthetic rows")
    parser.add_argument(
        "--fraud-rate", type=float, default=defaults.fraud_rate, help="synthetic fraud rate"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument(
        "--csv", type=Path, default=None, help="train on this CSV (transaction columns + is_fraud)"
    )
    parser.add_argument(
        "--from-ledger",
        metavar="URI",
        default=None,
        help="train on the decision ledger's labelled transactions (sqlite:///... or "
        "postgresql://...): each as its client sent it, with its imported outcome",
    )
    parser.add_argument(
        "--since", default=None, help="with --from-ledger: decisions from this day (UTC)"
    )
    parser.add_argument("--model-name", default=defaults.model_name, help="registered model")
    parser.add_argument("--alias", default=defaults.alias, help="alias to move if the model wins")
    parser.add_argument("--experiment", default=defaults.experiment, help="MLflow experiment")
    parser.add_argument(
        "--force", action="store_true", help="move the alias even if the model does not win"
    )
    parser.add_argument("--max-iter", type=int, default=defaults.max_iter, help="boosting rounds")
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="boosting step size"
    )
    parser.add_argument(
        "--max-leaf-nodes", type=int, default=defaults.max_leaf_nodes, help="leaves per tree"
    )
    parser.add_argument(
        "--l2-regularization", type=float, default=defaults.l2_regularization, help="L2 penalty"
    )
    parser.add_argument(
        "--bootstrap-embedded",
        action="store_true",
        help="only if the embedded store has nothing at MODEL_URI: train the demo model into "
        "it (what `python -m predictor` runs on its first start without MLFLOW_TRACKING_URI)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 2 with one line on stderr for bad input."""
    from predictor.settings import ConfigurationError, load_settings

    args = build_parser().parse_args(argv)
    config = TrainingConfig(
        rows=args.rows,
        fraud_rate=args.fraud_rate,
        seed=args.seed,
        csv=args.csv,
        ledger=args.from_ledger,
        ledger_since=args.since,
        model_name=args.model_name,
        alias=args.alias,
        experiment=args.experiment,
        force=args.force,
        max_iter=args.max_iter,
        learning_rate=args.learning_rate,
        max_leaf_nodes=args.max_leaf_nodes,
        l2_regularization=args.l2_regularization,
    )
    logging.basicConfig(level=logging.WARNING)
    # A progress bar per artifact download (the champion scored for comparison) says nothing.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        settings = load_settings()
        if args.bootstrap_embedded:
            ensure_demo_model(settings)
            return 0
        if args.since and not args.from_ledger:
            raise InvalidDataset("--since needs --from-ledger")
        if args.since:
            try:
                parse_day_or_time(args.since)
            except ValueError:
                raise InvalidDataset(f"--since: {args.since!r} is not a date") from None
        if config.rows < 100 or not 0 < config.fraud_rate < 1:
            raise InvalidDataset("--rows must be >= 100 and --fraud-rate between 0 and 1")
        train_and_register(config, *mlflow_destination(settings))
    except (InvalidDataset, ConfigurationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
