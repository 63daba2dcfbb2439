"""`fraud-report`: live quality per model version, from the decision ledger.

Each transaction counts once, by its latest decision in the window (a retried request
scores it again); it is labelled when `outcomes` has it. Per model version (and per UTC day
of the decision): decisions, flagged, labelled, labelled_fraud, true/false positives,
false negatives, precision = TP / (TP + FP), recall = TP / (TP + FN) and alert rate =
flagged / decisions, `null` where the denominator is 0.
"""

from __future__ import annotations

import argparse
import html
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from predictor.settings import ConfigurationError
from predictor.store import Store, StoreError, redacted

COUNTS = (
    "decisions",
    "flagged",
    "labelled",
    "labelled_fraud",
    "true_positives",
    "false_positives",
    "false_negatives",
)

_LATEST = """
WITH ranked AS (
    SELECT transaction_id, model_version, is_fraud, scored_at,
           ROW_NUMBER() OVER (PARTITION BY transaction_id ORDER BY scored_at DESC) AS newest
    FROM decisions
    WHERE scored_at >= ? AND scored_at < ?
)
SELECT r.model_version, {day} AS day,
       COUNT(*),
       SUM(CASE WHEN r.is_fraud THEN 1 ELSE 0 END),
       COUNT(o.transaction_id),
       SUM(CASE WHEN o.is_fraud THEN 1 ELSE 0 END),
       SUM(CASE WHEN r.is_fraud AND o.is_fraud THEN 1 ELSE 0 END),
       SUM(CASE WHEN r.is_fraud AND NOT o.is_fraud THEN 1 ELSE 0 END),
       SUM(CASE WHEN NOT r.is_fraud AND o.is_fraud THEN 1 ELSE 0 END)
FROM ranked r LEFT JOIN outcomes o ON o.transaction_id = r.transaction_id
WHERE r.newest = 1
GROUP BY r.model_version, day
ORDER BY r.model_version, day
"""
_DAY = {
    "sqlite": "substr(r.scored_at, 1, 10)",
    "postgresql": "to_char(r.scored_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}


@dataclass
class Quality:
    """Counts and rates for one model version (or one of its days)."""

    decisions: int = 0
    flagged: int = 0
    labelled: int = 0
    labelled_fraud: int = 0
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0

    def add(self, other: Quality) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def precision(self) -> float | None:
        return _ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> float | None:
        return _ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def alert_rate(self) -> float | None:
        return _ratio(self.flagged, self.decisions)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "alert_rate": self.alert_rate,
        }


@dataclass
class VersionQuality(Quality):
    by_day: dict[str, Quality] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        counts = Quality(**{name: getattr(self, name) for name in COUNTS}).as_dict()
        days = [{"day": day, **quality.as_dict()} for day, quality in sorted(self.by_day.items())]
        return {**counts, "by_day": days}


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def live_quality(store: Store, since: datetime, until: datetime) -> dict[str, VersionQuality]:
    """Model version -> its quality over decisions scored in [since, until)."""
    statement = _LATEST.format(day=_DAY[store.backend])
    rows = store.query(statement, (store.timestamp(since), store.timestamp(until)))
    versions: dict[str, VersionQuality] = {}
    for version, day, *counts in rows:
        quality = Quality(*(int(count or 0) for count in counts))
        entry = versions.setdefault(version, VersionQuality())
        entry.add(quality)
        entry.by_day[day] = quality
    return versions


def as_json(versions: dict[str, VersionQuality]) -> list[dict[str, Any]]:
    return [
        {"model_version": version, **quality.as_dict()}
        for version, quality in sorted(versions.items(), key=lambda item: _version_key(item[0]))
    ]


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def as_text(report: list[dict[str, Any]], since: datetime, until: datetime) -> str:
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        f"live quality, decisions scored {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC",
        f"{'version':>8} {'decisions':>10} {'flagged':>8} {'labelled':>9} {'fraud':>7} "
        f"{'TP':>6} {'FP':>6} {'FN':>6} {'precision':>9} {'recall':>7} {'alert rate':>10}",
    ]
    for entry in report:
        lines.append(
            f"{entry['model_version']:>8} {entry['decisions']:>10} {entry['flagged']:>8} "
            f"{entry['labelled']:>9} {entry['labelled_fraud']:>7} {entry['true_positives']:>6} "
            f"{entry['false_positives']:>6} {entry['false_negatives']:>6} "
            f"{rate(entry['precision']):>9} {rate(entry['recall']):>7} "
            f"{rate(entry['alert_rate']):>10}"
        )
    if not report:
        lines.append("no decisions in the window")
    return "\n".join(lines) + "\n"


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def _plot(title: str, report: list[dict[str, Any]], measures: tuple[str, ...]) -> str:
    """An inline SVG line chart: one line per version (and measure), days on x, 0-1 on y."""
    days = sorted({day["day"] for entry in report for day in entry["by_day"]})
    width, height, left, bottom = 640, 260, 48, 36
    plot_w, plot_h = width - left - 16, height - bottom - 24

    def x(day: str) -> float:
        return left + (days.index(day) + 0.5) * plot_w / max(1, len(days))

    def y(value: float) -> float:
        return 24 + (1 - value) * plot_h

    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>',
        f'<line x1="{left}" y1="{y(0)}" x2="{width - 16}" y2="{y(0)}" stroke="#888"/>',
        f'<line x1="{left}" y1="{y(0)}" x2="{left}" y2="{y(1)}" stroke="#888"/>',
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1):
        parts.append(
            f'<text x="{left - 6}" y="{y(tick) + 4}" font-size="11" text-anchor="end">{tick}</text>'
        )
    for day in days:
        parts.append(
            f'<text x="{x(day)}" y="{height - 14}" font-size="10" text-anchor="middle">'
            f"{day[5:]}</text>"
        )
    legend = []
    for index, (entry, measure) in enumerate(
        (entry, measure) for entry in report for measure in measures
    ):
        colour = _COLOURS[index % len(_COLOURS)]
        dash = ' stroke-dasharray="5 3"' if measure == "recall" else ""
        points = [
            (x(day["day"]), y(day[measure])) for day in entry["by_day"] if day[measure] is not None
        ]
        if points:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
            )
            parts.extend(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in points
            )
        legend.append(
            f'<span style="color:{colour}">&#9632; v{html.escape(entry["model_version"])} '
            f"{measure}</span>"
        )
    parts.append("</svg>")
    return f"<h2>{html.escape(title)}</h2>{''.join(parts)}<p>{' &nbsp; '.join(legend)}</p>"


def as_html(report: list[dict[str, Any]], since: datetime, until: datetime) -> str:
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{'-' if entry[key] is None else html.escape(_cell(entry[key]))}</td>"
            for key in ("model_version", *COUNTS, "precision", "recall", "alert_rate")
        )
        + "</tr>"
        for entry in report
    )
    heads = "".join(
        f"<th>{name}</th>" for name in ("version", *COUNTS, "precision", "recall", "alert rate")
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>Fraud model live quality</title><style>body{font-family:sans-serif;"
        "margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Fraud model live quality</h1><p>Decisions scored {since:%Y-%m-%d %H:%M} to "
        f"{until:%Y-%m-%d %H:%M} UTC; each transaction by its latest decision, labelled by "
        f"the outcomes imported.</p><table><tr>{heads}</tr>{rows}</table>"
        + _plot("Alert rate per day", report, ("alert_rate",))
        + _plot(
            "Precision and recall per day (labelled transactions)", report, ("precision", "recall")
        )
        + "</body></html>\n"
    )


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def push(report: list[dict[str, Any]], gateway: str) -> None:
    """The latest figures per version to a Prometheus Pushgateway (job `fraud-report`)."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    gauges = {
        name: Gauge(f"fraud_live_{name}", help_text, ["model_version"], registry=registry)
        for name, help_text in (
            ("decisions", "Transactions decided in the report's window (latest decision each)."),
            ("labelled", "Of them, transactions with a known outcome."),
            ("precision", "Flagged and fraud / flagged, over labelled transactions."),
            ("recall", "Flagged and fraud / fraud, over labelled transactions."),
            ("alert_rate", "Flagged / decided."),
        )
    }
    for entry in report:
        for name, gauge in gauges.items():
            if entry[name] is not None:
                gauge.labels(model_version=entry["model_version"]).set(entry[name])
    Gauge(
        "fraud_report_last_success_timestamp_seconds",
        "When fraud-report last pushed its figures.",
        registry=registry,
    ).set_to_current_time()
    push_to_gateway(gateway, job="fraud-report", registry=registry, timeout=30)


def parse_day_or_time(text: str, end: bool = False) -> datetime:
    """`2026-12-01` (the day's start, or with `end` the next day's) or an ISO date-time."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start + timedelta(days=1) if end else start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fraud-report",
        description="Live precision, recall and alert rate per model version, from the "
        "decision ledger joined with the imported outcomes.",
    )
    parser.add_argument("--ledger", help="database URI (default: DECISION_LOG_URI)")
    parser.add_argument("--since", help="first day (or ISO date-time) of decisions, UTC")
    parser.add_argument("--until", help="last day included (or an ISO date-time, excluded)")
    parser.add_argument("--days", type=int, help="the last N days (instead of --since)")
    parser.add_argument("--format", choices=("text", "json", "html"), default="text")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    parser.add_argument("--pushgateway", help="also push the figures to this Pushgateway URL")
    args = parser.parse_args(argv)
    try:
        until = parse_day_or_time(args.until, end=True) if args.until else datetime.now(UTC)
        if args.days is not None:
            since = until - timedelta(days=args.days)
        else:
            since = (
                parse_day_or_time(args.since) if args.since else datetime(1970, 1, 1, tzinfo=UTC)
            )
    except ValueError as error:
        parser.error(f"--since/--until: {error}")
    try:
        from predictor.outcomes import default_ledger

        ledger = args.ledger or default_ledger()
        if ledger == "none":
            print("error: no ledger: set DECISION_LOG_URI or pass --ledger", file=sys.stderr)
            return 2
        store = Store(ledger)
        try:
            store.migrate()
            report = as_json(live_quality(store, since, until))
        finally:
            store.close()
    except (StoreError, ConfigurationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.format == "json":
        output = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
    elif args.format == "html":
        output = as_html(report, since, until)
    else:
        output = as_text(report, since, until)
    if args.out:
        args.out.write_text(output, encoding="utf-8")
    else:
        sys.stdout.write(output)
    if args.pushgateway:
        try:
            push(report, args.pushgateway)
        except OSError as error:
            print(f"error: pushing to {args.pushgateway}: {error}", file=sys.stderr)
            return 1
        print(f"pushed {len(report)} version(s) to {args.pushgateway}", file=sys.stderr)
    print(f"read {redacted(ledger)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
