"""`fraud-models`: list versions, promote, roll back, and compare champion and challenger on
live traffic, on the embedded store and an MLflow server alike (MLFLOW_TRACKING_URI, as
the server reads it).

Every move of an alias is recorded: the version moved to gets `promoted_*` tags (who, when,
why, from which version), and the registered model remembers the version the alias held
before (`previous_<alias>`), which `rollback` moves it back to.

`promote --challenger` promotes on evidence: from the decision ledger, on the transactions
both scored (the challenger in shadow), the challenger's precision and recall on labelled
ones must not be worse than the champion's by more than `--tolerance`, with at least
`--min-labelled` labelled transactions of which `--min-fraud` fraud; `--force` overrides.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

from predictor import registry
from predictor.report import Quality, parse_day_or_time
from predictor.settings import DEFAULT_MODEL_NAME, ConfigurationError, load_settings
from predictor.store import Store, StoreError

CHAMPION, CHALLENGER = "champion", "challenger"
METRICS = ("pr_auc", "roc_auc", "precision", "recall")

_PAIRS = """
WITH ranked AS (
    SELECT transaction_id, model_version, probability, threshold, is_fraud,
           shadow_version, shadow_probability,
           ROW_NUMBER() OVER (PARTITION BY transaction_id ORDER BY scored_at DESC) AS newest
    FROM decisions
    WHERE shadow_version IS NOT NULL AND shadow_probability IS NOT NULL AND scored_at >= ?
)
SELECT r.model_version, r.shadow_version, r.is_fraud, r.shadow_probability, o.is_fraud
FROM ranked r LEFT JOIN outcomes o ON o.transaction_id = r.transaction_id
WHERE r.newest = 1 AND r.model_version = ? AND r.shadow_version = ?
"""


class Refused(Exception):
    """The command cannot do what was asked; the message says why, in one line."""


@dataclass
class Comparison:
    """Champion against shadow challenger on the same (latest-decided) transactions."""

    champion: str
    challenger: str
    challenger_threshold: float
    transactions: int = 0
    agreements: int = 0
    labelled: int = 0
    labelled_fraud: int = 0

    def __post_init__(self) -> None:
        self.champion_side = Quality()
        self.challenger_side = Quality()

    @property
    def agreement_rate(self) -> float | None:
        return self.agreements / self.transactions if self.transactions else None

    def flag_rate(self, side: Quality) -> float | None:
        return side.flagged / self.transactions if self.transactions else None


def compare(store: Store, champion: str, challenger: str, threshold: float, since: datetime):
    """The comparison of `champion` with `challenger` (judged at `threshold`)."""
    result = Comparison(champion, challenger, threshold)
    rows = store.query(_PAIRS, (store.timestamp(since), champion, challenger))
    for _, _, champion_flag, shadow_probability, outcome in rows:
        champion_flag = bool(champion_flag)
        challenger_flag = shadow_probability >= threshold
        result.transactions += 1
        result.agreements += champion_flag == challenger_flag
        result.champion_side.flagged += champion_flag
        result.challenger_side.flagged += challenger_flag
        if outcome is None:
            continue
        outcome = bool(outcome)
        result.labelled += 1
        result.labelled_fraud += outcome
        for side, flag in (
            (result.champion_side, champion_flag),
            (result.challenger_side, challenger_flag),
        ):
            side.true_positives += flag and outcome
            side.false_positives += flag and not outcome
            side.false_negatives += (not flag) and outcome
    return result


def gate(result: Comparison, tolerance: float, min_labelled: int, min_fraud: int) -> str | None:
    """Why the challenger may not be promoted, or None."""
    if result.labelled < min_labelled or result.labelled_fraud < min_fraud:
        return (
            f"too little labelled evidence: {result.labelled} labelled transactions "
            f"({result.labelled_fraud} fraud) scored by both {result.champion} and "
            f"{result.challenger}; need {min_labelled} ({min_fraud} fraud)"
        )
    for measure in ("precision", "recall"):
        mine = getattr(result.challenger_side, measure)
        theirs = getattr(result.champion_side, measure)
        if theirs is not None and (mine is None or mine < theirs - tolerance):
            shown = "undefined" if mine is None else f"{mine:.4f}"
            return (
                f"challenger version {result.challenger} {measure} {shown} is worse than "
                f"champion version {result.champion}'s {theirs:.4f} by more than {tolerance} "
                f"on {result.labelled} labelled live transactions"
            )
    return None


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def describe(result: Comparison) -> str:
    lines = [
        f"champion {result.champion} vs challenger {result.challenger} (shadow, threshold "
        f"{result.challenger_threshold:.4f}) on {result.transactions} live transactions",
        f"  agreement rate {_rate(result.agreement_rate)} ({result.agreements} agree)",
        f"  labelled {result.labelled} ({result.labelled_fraud} fraud)",
        f"  {'':<12} {'flag rate':>9} {'precision':>9} {'recall':>7} {'TP':>5} {'FP':>5} {'FN':>5}",
    ]
    for name, side in (("champion", result.champion_side), ("challenger", result.challenger_side)):
        lines.append(
            f"  {name:<12} {_rate(result.flag_rate(side)):>9} {_rate(side.precision):>9} "
            f"{_rate(side.recall):>7} {side.true_positives:>5} {side.false_positives:>5} "
            f"{side.false_negatives:>5}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- registry


def _aliases(client, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def _version_at(client, name: str, alias: str) -> str:
    version = _aliases(client, name).get(alias)
    if version is None:
        raise Refused(f"{name} has no alias '{alias}'")
    return str(version)


def move_alias(client, name: str, alias: str, version: str, reason: str) -> str | None:
    """Point `alias` at `version`, recording who, when, why and what it held before."""
    previous = _aliases(client, name).get(alias)
    client.get_model_version(name, version)  # refuses an unknown version
    client.set_registered_model_alias(name, alias, version)
    if previous is not None and str(previous) != str(version):
        client.set_registered_model_tag(name, f"previous_{alias}", str(previous))
    for key, value in (
        ("promoted_to", alias),
        ("promoted_by", f"{getpass.getuser()}@{socket.gethostname()}"),
        ("promoted_at", datetime.now(UTC).isoformat(timespec="seconds")),
        ("promotion_reason", reason),
        ("promoted_from", "none" if previous is None else str(previous)),
    ):
        client.set_model_version_tag(name, version, key, value)
    return None if previous is None else str(previous)


def list_versions(client, name: str) -> str:
    aliases = _aliases(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    header = (
        f"{'version':>7}  {'aliases':<22} {'threshold':>9} "
        + " ".join(f"{m:>9}" for m in METRICS)
        + "  created (UTC)        promoted"
    )
    lines = [f"{name}", header]
    for version in versions:
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
        held = ",".join(sorted(by_version.get(str(version.version), [])))
        promoted = version.tags.get("promoted_at", "")
        if promoted:
            promoted += f" by {version.tags.get('promoted_by', '?')}: "
            promoted += version.tags.get("promotion_reason", "")
        lines.append(
            f"{version.version:>7}  {held:<22} "
            f"{version.tags.get(registry.THRESHOLD_TAG, '-'):>9} "
            + " ".join(
                f"{metrics[f'test_{m}']:>9.4f}" if f"test_{m}" in metrics else f"{'-':>9}"
                for m in METRICS
            )
            + f"  {created:%Y-%m-%d %H:%M:%S}  {promoted}"
        )
    tags = client.get_registered_model(name).tags
    for alias, version in sorted(aliases.items()):
        before = tags.get(f"previous_{alias}")
        lines.append(
            f"@{alias} serves version {version}"
            + (f" (rollback goes to {before})" if before else "")
        )
    return "\n".join(lines)


def _threshold(client, name: str, version: str) -> float:
    value = client.get_model_version(name, version).tags.get(registry.THRESHOLD_TAG)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Refused(f"version {version} has no usable {registry.THRESHOLD_TAG} tag") from None


def _open_ledger(uri: str | None, settings) -> Store:
    uri = uri or settings.decision_log_location
    if uri == "none":
        raise Refused("no decision ledger: set DECISION_LOG_URI or pass --ledger")
    store = Store(uri)
    store.migrate()
    return store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraud-models",
        description="Model versions and aliases in the MLflow registry the server reads "
        "(MLFLOW_TRACKING_URI, or the embedded store).",
    )
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="versions, aliases, thresholds, training metrics")
    promote = commands.add_parser("promote", help="move @champion (or --alias) to a version")
    target = promote.add_mutually_exclusive_group(required=True)
    target.add_argument("version", nargs="?", help="the version to promote")
    target.add_argument(
        "--challenger", action="store_true", help="promote @challenger, on live evidence"
    )
    promote.add_argument("--alias", default=CHAMPION, help="the alias to move")
    promote.add_argument("--reason", default="", help="why (recorded on the version)")
    promote.add_argument("--force", action="store_true", help="promote despite the evidence")
    rollback = commands.add_parser("rollback", help="move the alias back to where it was")
    rollback.add_argument("--alias", default=CHAMPION)
    rollback.add_argument("--reason", default="rollback")
    comparing = commands.add_parser("compare", help="champion vs shadow challenger, live")
    for command in (promote, comparing):
        command.add_argument("--ledger", help="database URI (default: DECISION_LOG_URI)")
        command.add_argument("--since", help="decisions from this day (UTC)")
        command.add_argument(
            "--tolerance",
            type=float,
            default=0.02,
            help="how much worse precision or recall may be",
        )
        command.add_argument(
            "--min-labelled", type=int, default=200, help="labelled transactions needed"
        )
        command.add_argument(
            "--min-fraud", type=int, default=20, help="labelled fraud among them needed"
        )
    return parser


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    client = registry.connect(settings.tracking_uri)
    name = args.model_name
    if args.command == "list":
        print(list_versions(client, name))
        return 0
    if args.command == "rollback":
        previous = client.get_registered_model(name).tags.get(f"previous_{args.alias}")
        if previous is None:
            raise Refused(f"{name}: no previous version of '{args.alias}' is recorded")
        current = _version_at(client, name, args.alias)
        move_alias(client, name, args.alias, previous, args.reason)
        print(f"{name}@{args.alias}: version {current} -> {previous} (rollback)")
        return 0
    if args.command == "promote" and not args.challenger:
        previous = move_alias(client, name, args.alias, args.version, args.reason or "promoted")
        print(f"{name}@{args.alias}: version {previous or 'none'} -> {args.version}")
        return 0
    champion = _version_at(client, name, CHAMPION)
    challenger = _version_at(client, name, CHALLENGER)
    since = parse_day_or_time(args.since) if args.since else datetime(1970, 1, 1, tzinfo=UTC)
    store = _open_ledger(args.ledger, settings)
    try:
        result = compare(store, champion, challenger, _threshold(client, name, challenger), since)
    finally:
        store.close()
    print(describe(result))
    if args.command == "compare":
        return 0
    why_not = gate(result, args.tolerance, args.min_labelled, args.min_fraud)
    if why_not and not args.force:
        raise Refused(f"not promoted: {why_not} (--force promotes anyway)")
    reason = args.reason or (
        f"live evidence: precision {_rate(result.challenger_side.precision)} vs "
        f"{_rate(result.champion_side.precision)}, recall "
        f"{_rate(result.challenger_side.recall)} vs {_rate(result.champion_side.recall)} "
        f"on {result.labelled} labelled"
        if not why_not
        else f"forced: {why_not}"
    )
    move_alias(client, name, CHAMPION, challenger, reason)
    print(f"{name}@{CHAMPION}: version {champion} -> {challenger} ({reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Refused as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ConfigurationError, StoreError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except MlflowException as error:
        print(f"error: {' '.join(str(error).split())[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
