"""`python -m predictor`: KServe's ModelServer flags, settings from the environment/.env."""

from __future__ import annotations

import argparse
import logging
import sys

from kserve import model_server
from mlflow.exceptions import MlflowException

from predictor import registry
from predictor.model import FraudModel
from predictor.server import build_server
from predictor.settings import DEFAULT_MODEL_NAME, ConfigurationError, load_settings

logger = logging.getLogger("predictor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        description="Fraud-detection model server (KServe V1/V2) fed from an MLflow registry.",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(model_name=DEFAULT_MODEL_NAME)
    return parser.parse_args(argv)


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    registry.configure_http(settings.model_load_timeout_seconds)
    model = FraudModel(args.model_name, settings)
    try:
        if settings.uses_embedded_store:
            from predictor.training import ensure_demo_model

            ensure_demo_model(settings, log=logger.info)
        model.load()
    except (MlflowException, registry.ModelLoadError, OSError) as error:
        logger.error("cannot load %s from %s: %s", settings.model_uri, settings.tracking_uri, error)
        return 1
    server = build_server(
        settings.max_request_bytes,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        enable_grpc=args.enable_grpc,
    )
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
