"""`fraud-predictor` (`python -m predictor`): KServe's ModelServer flags, settings from the
environment/.env."""

from __future__ import annotations

import gc
import sys

# Metrics storage is chosen when prometheus_client is first imported (by KServe too), and
# native thread pools when numpy loads, so both are set up before anything else is imported.
from predictor.runtime import (
    import_model_loader,
    pin_native_threads,
    prepare_run_dir,
    wants_workers,
)

# Start-up makes millions of objects that live as long as the process (modules, classes);
# the cyclic GC would scan them over and over while they are made (about 0.4 s of a 2 s
# start, measured here). Collection resumes once they are in, with all of them frozen.
gc.disable()
pin_native_threads()
if wants_workers(sys.argv[1:]):
    prepare_run_dir()  # shared metrics and readiness across worker processes
else:
    # First, while few modules are loaded (see import_model_loader). `--workers` processes
    # are spawned without running this module: they import it when they load, after they
    # have started (KServe restarts a worker that is not up within 5 s).
    import_model_loader()

import argparse  # noqa: E402
import copy  # noqa: E402
import logging.config  # noqa: E402
import textwrap  # noqa: E402

from kserve import model_server  # noqa: E402

from predictor import auth, registry, seam  # noqa: E402
from predictor.bootstrap import BootstrapError, ensure_embedded_model  # noqa: E402
from predictor.logs import configure_logging, json_log_config  # noqa: E402
from predictor.model import FraudModel  # noqa: E402
from predictor.runtime import remove_run_dir, tune_gc  # noqa: E402
from predictor.server import build_server  # noqa: E402
from predictor.settings import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    ConfigurationError,
    Settings,
    load_settings,
)

logger = logging.getLogger("predictor.server")

gc.freeze()
tune_gc()
gc.enable()


#: KServe flags this server does not honour, and why: refused at start (exit 2, one line)
#: rather than silently ignored, and said so in `--help`.
NOT_HONOURED = {
    "grpc_max_send_message_length": "answers are as large as the request allows",
    "grpc_max_receive_message_length": "set MAX_REQUEST_BYTES (it bounds REST and gRPC)",
    "access_log_format": "set ACCESS_LOG=true for uvicorn's access log (asgi-logger, which "
    "formats KServe's, is not installed)",
    "configure_logging": "logging is configured by LOG_FORMAT and ACCESS_LOG (or "
    "--log_config_file)",
}
#: KServe's transformer flags (how a transformer calls its predictor): this server is the
#: predictor. Refused when set, hidden from `--help`.
TRANSFORMER_ONLY = (
    "predictor_host",
    "protocol",
    "predictor_use_ssl",
    "predictor_request_timeout_seconds",
    "predictor_request_retries",
    "enable_predictor_health_check",
)
#: What `--help` says of the flags whose KServe help does not describe this server.
HELP = {
    "event_loop": "Event loop: 'auto' (the default) runs asyncio's loop in a single process "
    "(lower tail latency) and uvloop in each --workers process (uvicorn's choice); "
    "'asyncio' and 'uvloop' run that loop everywhere.",
    "predictor_protocol": "A transformer's flag: accepted (KServe deployments may pass it), "
    "no effect on this server, which serves V1, V2 and gRPC alike.",
    "enable_latency_logging": "Log a line per request with preprocess/predict/postprocess "
    "latency (logger kserve.trace); the same figures are in /metrics.",
    "log_config_file": "A YAML or JSON logging configuration for KServe, uvicorn and every "
    "worker (not with LOG_FORMAT=json).",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flags with their defaults; the environment's settings laid out as written."""


def settings_help(width: int = 100) -> str:
    """`--help`'s epilog: every setting of predictor.settings.Settings, read from the
    environment or `.env`, with its default and description."""
    lines = ["environment (or .env in the working directory):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else str(default)
        lines.append(f"  {name.upper()} (default: {shown})")
        if field.description:
            lines.extend(
                textwrap.wrap(
                    field.description,
                    width,
                    initial_indent=" " * 6,
                    subsequent_indent=" " * 6,
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """KServe's ModelServer flags (a copy: KServe's own parser is left as it is), each one
    honoured or refused at start, and the environment's settings in the epilog."""
    kserve_flags = copy.deepcopy(model_server.parser)
    for action in seam.parser_actions(kserve_flags):
        if action.dest in TRANSFORMER_ONLY:
            action.help = argparse.SUPPRESS
        elif action.dest in NOT_HONOURED:
            action.help = f"Refused by this server: {NOT_HONOURED[action.dest]}."
        elif action.dest in HELP:
            action.help = HELP[action.dest]
    parser = argparse.ArgumentParser(
        prog="fraud-predictor",
        description="Fraud-detection model server (KServe V1/V2 and gRPC) fed from an MLflow "
        "registry. Flags are KServe's ModelServer flags; everything else is configured by "
        "the environment (below). `fraud-predictor token --help`: bearer tokens for "
        "AUTH_TOKENS_FILE.",
        parents=[kserve_flags],
        formatter_class=HelpFormatter,
        epilog=settings_help(),
    )
    # A log line per request costs more than scoring a transaction: latency is in /metrics.
    parser.set_defaults(model_name=DEFAULT_MODEL_NAME, enable_latency_logging=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def refused_flags(args: argparse.Namespace, settings: Settings) -> str | None:
    """Why the command line cannot be served as given, in one line, or None."""
    for name in (*NOT_HONOURED, *TRANSFORMER_ONLY):
        if getattr(args, name) != model_server.parser.get_default(name):
            reason = NOT_HONOURED.get(name, "this server is a predictor, not a transformer")
            return f"--{name} is not honoured by this server: {reason}"
    if args.log_config_file and settings.log_format == "json":
        return "--log_config_file and LOG_FORMAT=json both configure logging: use one"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        return make_token(argv[1:])
    try:
        return serve(parse_args(argv))
    finally:
        remove_run_dir()


def make_token(argv: list[str]) -> int:
    """`fraud-predictor token --name payments --scopes predict`: a new token on the first
    line (give it to the client), its AUTH_TOKENS_FILE line on the second."""
    parser = argparse.ArgumentParser(
        prog="fraud-predictor token",
        description="Make a bearer token and the line that grants it in AUTH_TOKENS_FILE.",
    )
    parser.add_argument("--name", required=True, help="who holds it (logged on denials)")
    parser.add_argument(
        "--scopes",
        default="predict",
        help=f"comma-separated, of {', '.join(auth.SCOPES)}",
    )
    args = parser.parse_args(argv)
    scopes = args.scopes.split(",")
    line = auth.token_line(token := auth.new_token(), scopes, args.name)
    try:
        auth.parse_tokens(line)
    except auth.TokenFileError as error:
        parser.error(str(error).removeprefix("line 1: "))
    print(token)
    print(line)
    return 0


def load_tokens(settings: Settings) -> auth.TokenStore | None:
    """AUTH_TOKENS_FILE's tokens; without it every caller is trusted, and told so."""
    if settings.auth_tokens_file is None:
        logger.warning(
            "AUTH_TOKENS_FILE is not set: every caller that reaches %s may score, explain "
            "and read metadata",
            settings.bind_address,
        )
        return None
    try:
        return auth.TokenStore(settings.auth_tokens_file)
    except auth.TokenFileError as error:
        raise ConfigurationError(f"AUTH_TOKENS_FILE={settings.auth_tokens_file}: {error}") from None


def serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (refusal := refused_flags(args, settings)) is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    if settings.log_format == "json":
        # Every logger of every process, KServe's and uvicorn's too (KServe reconfigures
        # logging from this in the server and in each worker).
        log_config = json_log_config()
        seam.set_worker_log_config(log_config)
        logging.config.dictConfig(log_config)
        logging.captureWarnings(True)
    try:
        ensure_embedded_model(settings)  # before the server starts, and before its workers
    except BootstrapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        tokens = load_tokens(settings)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    registry.configure_client(settings.model_load_timeout_seconds)
    model = FraudModel(args.model_name, settings)
    server = build_server(
        model,
        settings,
        tokens,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        enable_grpc=args.enable_grpc,
        enable_latency_logging=args.enable_latency_logging,
        event_loop=args.event_loop,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_docs_url=args.enable_docs_url,
        timeout_keep_alive=args.timeout_keep_alive,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    server.start([])  # returns after a graceful shutdown (SIGTERM/SIGINT)
    model.close_ledger()
    return 0


if __name__ == "__main__":
    sys.exit(main())
