"""Client-controlled text on its way into an answer or a log line: one line, bounded, with
nothing that can forge a line or reorder what a reader sees."""

from __future__ import annotations

import re

import orjson

#: C0/C1 controls, DEL, and the invisible or reordering format characters (bidirectional
#: overrides and isolates, zero-width marks, line/paragraph separators, BOM).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]"
)
#: Error bodies, REST and gRPC, are at most this many bytes.
MAX_ERROR_BYTES = 4096


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escaped(text: str, limit: int = 500) -> str:
    """`text` cut at `limit` characters, with unsafe characters written as `\\xNN`/`\\uNNNN`."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return _UNSAFE.sub(_escape, text)


def error_text(message: str, max_bytes: int = MAX_ERROR_BYTES - 64) -> str:
    """An error message escaped and cut so that it fits `max_bytes` once UTF-8 encoded."""
    text = escaped(message, limit=max_bytes)
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    cut = text.encode("utf-8")[: max_bytes - 32].decode("utf-8", "ignore")
    return f"{cut}... (cut at {max_bytes} bytes)"


def error_body(message: str) -> bytes:
    """`{"error": message}` as JSON of at most MAX_ERROR_BYTES, the message made safe."""
    text = error_text(message)
    body = orjson.dumps({"error": text})
    while len(body) > MAX_ERROR_BYTES:  # JSON escapes can double a character: shrink
        text = text[: len(text) * 3 // 4] + "... (cut)"
        body = orjson.dumps({"error": text})
    return body


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception for a message or a log line: its type and its text on one line,
    escaped and cut at `limit` characters."""
    return f"{type(error).__name__}: {escaped(' '.join(str(error).split()), limit)}"
