"""Bearer tokens and scopes: who may score, explain or change what is served.

`AUTH_TOKENS_FILE` holds one line per token, `sha256:<hex digest> <scope>[,<scope>...] <name>`
(`#` comments and blank lines allowed). Only digests are stored, so the file (a Kubernetes
Secret) leaks no usable token. Clients send `Authorization: Bearer <token>` (gRPC: the
`authorization` metadata). The file is re-read when it changes; one that fails to parse
keeps the previous tokens.

Scopes: `predict` (every scoring door), `explain` (`:explain`), `admin` (anything else that
changes state: nothing today, the model follows its registry alias). Every other path but
the probes and `/metrics` needs a valid token of any scope.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from predictor.text import escaped

logger = logging.getLogger("predictor.auth")

SCOPES = ("predict", "explain", "admin")
#: How often the token file is re-read (a change takes effect within this).
RELOAD_SECONDS = 2.0

_LINE = re.compile(r"^sha256:(?P<digest>[0-9a-fA-F]{64})\s+(?P<scopes>\S+)\s+(?P<name>\S.*)$")
#: RFC 6750's b64token: what a bearer token may be made of.
_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +(?P<token>[A-Za-z0-9\-._~+/]+=*) *$")


class Access(Enum):
    """What a request needs: nothing (probes, metrics), any valid token, or a scope."""

    OPEN = "open"
    AUTHENTICATED = "authenticated"
    PREDICT = "predict"
    EXPLAIN = "explain"
    ADMIN = "admin"


class Denied(Exception):
    """A request refused: `reason` is missing, invalid (401) or scope (403)."""

    def __init__(self, reason: str, message: str, name: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.name = name

    @property
    def status(self) -> int:
        return 403 if self.reason == "scope" else 401


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class Token:
    digest: bytes
    scopes: frozenset[str]
    name: str


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe (a valid RFC 6750 bearer token)."""
    return secrets.token_urlsafe(32)


def token_line(token: str, scopes: list[str], name: str) -> str:
    """The token file's line for `token` (what `fraud-predictor token` prints)."""
    return f"sha256:{token_digest(token)} {','.join(scopes)} {name}"


def parse_tokens(text: str) -> tuple[Token, ...]:
    """Every token of a token file, or TokenFileError naming the first bad line."""
    tokens: list[Token] = []
    seen: set[bytes] = set()
    names: set[str] = set()
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise TokenFileError(
                f"line {number}: expected 'sha256:<64 hex digits> <scope>[,<scope>...] <name>'"
            )
        scopes = match["scopes"].split(",")
        unknown = [scope for scope in scopes if scope not in SCOPES]
        if unknown or not all(scopes):
            raise TokenFileError(
                f"line {number}: unknown scope(s) {unknown or ['']}; scopes are {list(SCOPES)}"
            )
        digest = bytes.fromhex(match["digest"])
        if digest in seen:
            raise TokenFileError(f"line {number}: the same token hash appears twice")
        name = match["name"].strip()
        if name in names:
            raise TokenFileError(
                f"line {number}: the name {escaped(name, 100)!r} is already given to another "
                "token (denials are logged by name)"
            )
        seen.add(digest)
        names.add(name)
        tokens.append(Token(digest, frozenset(scopes), name))
    return tuple(tokens)


def bearer_token(authorization: str | list[str] | None) -> str:
    """The token of an `Authorization: Bearer <token>` value, or Denied (also for several
    values: a proxy that picked another one would disagree with the server)."""
    if isinstance(authorization, list):
        if len(authorization) > 1:
            raise Denied("invalid", "more than one Authorization header")
        authorization = authorization[0] if authorization else None
    if not authorization:
        raise Denied("missing", "missing bearer token: send 'Authorization: Bearer <token>'")
    match = _BEARER.match(authorization)
    if match is None:
        raise Denied("invalid", "malformed Authorization header: expected 'Bearer <token>'")
    return match["token"]


class TokenStore:
    """The tokens of AUTH_TOKENS_FILE, re-read in the background when the file changes."""

    def __init__(self, path: Path, reload_seconds: float = RELOAD_SECONDS):
        self.path = path
        self.reload_seconds = reload_seconds
        self._tokens: tuple[Token, ...] = ()
        #: The file's content last read (None: not read yet, or unreadable last time).
        self._seen: bytes | None = None
        self._unreadable = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reload(initial=True)

    def __getstate__(self) -> dict:
        """Pickled into each `--workers` process: the tokens, not the thread."""
        state = self.__dict__.copy()
        state.update(_stop=None, _thread=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._stop = threading.Event()

    @property
    def tokens(self) -> tuple[Token, ...]:
        return self._tokens

    def reload(self, initial: bool = False) -> bool:
        """Re-read the file if it changed; True when the tokens were replaced.

        At start a bad file raises TokenFileError (the server must not start open); later,
        the previous tokens stay and the problem is logged once per version of the file.
        """
        try:
            content = self.path.read_bytes()
        except OSError as error:
            if initial:
                raise TokenFileError(f"cannot read: {error.strerror or error}") from None
            if not self._unreadable:
                logger.error(
                    "AUTH_TOKENS_FILE %s: cannot read (%s); keeping the previous tokens",
                    self.path,
                    error.strerror or error,
                )
                self._unreadable = True
                self._seen = None
            return False
        self._unreadable = False
        if content == self._seen:
            return False
        self._seen = content
        try:
            tokens = parse_tokens(content.decode("utf-8"))
        except (TokenFileError, UnicodeDecodeError) as error:
            if initial:
                raise TokenFileError(str(error)) from None
            logger.error(
                "AUTH_TOKENS_FILE %s: %s; keeping the previous %d token(s)",
                self.path,
                error,
                len(self._tokens),
            )
            return False
        self._tokens = tokens
        names = escaped(", ".join(sorted(token.name for token in tokens)), 500) or "none"
        logger.info(
            "%s %d token(s) from %s: %s",
            "loaded" if initial else "reloaded",
            len(tokens),
            self.path,
            names,
        )
        if not tokens:
            logger.warning(
                "AUTH_TOKENS_FILE %s holds no token: every request but the probes "
                "and /metrics is refused",
                self.path,
            )
        return True

    def start(self) -> None:
        """Follow the file in a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="token-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.reload_seconds):
            try:
                self.reload()
            except Exception:  # never let the thread die: the previous tokens stay
                logger.exception("AUTH_TOKENS_FILE %s: reload failed", self.path)

    def identify(self, token: str) -> Token | None:
        """The token's entry, comparing digests in constant time against every entry."""
        digest = hashlib.sha256(token.encode("ascii")).digest()
        found = None
        for entry in self._tokens:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found

    def authorize(self, authorization: str | list[str] | None, access: Access) -> Token | None:
        """The caller's token if it may do what `access` names, else Denied."""
        if access is Access.OPEN:
            return None
        entry = self.identify(bearer_token(authorization))
        if entry is None:
            raise Denied("invalid", "invalid bearer token")
        if access is not Access.AUTHENTICATED and access.value not in entry.scopes:
            raise Denied(
                "scope", f"token {entry.name!r} lacks the {access.value!r} scope", entry.name
            )
        return entry


_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
_V2_MODEL_READY = re.compile(r"^/v2/models/[^/]+/ready$")
_V2_INFER = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
_V1_MODEL = re.compile(r"^/v1/models/[^/]+$")


def http_access(method: str, path: str) -> Access:
    """What an HTTP request to `path` needs (the path as routed: percent-decoded; a path
    with control characters never gets here, see edges.Authentication)."""
    if path.startswith("/v1/models/"):
        if path.endswith(":predict"):
            return Access.PREDICT
        if path.endswith(":explain"):
            return Access.EXPLAIN
        if method in ("GET", "HEAD") and _V1_MODEL.match(path):
            return Access.OPEN
        return Access.AUTHENTICATED
    if path in _OPEN_PATHS or _V2_MODEL_READY.match(path):
        return Access.OPEN
    if _V2_INFER.match(path):
        return Access.PREDICT
    return Access.AUTHENTICATED


#: gRPC methods of the V2 service by what they need (anything not listed: a valid token).
GRPC_ACCESS = {
    "ServerLive": Access.OPEN,
    "ServerReady": Access.OPEN,
    "ModelReady": Access.OPEN,
    "ModelInfer": Access.PREDICT,
}


def grpc_access(method_name: str) -> Access:
    """`/inference.GRPCInferenceService/ModelInfer` -> Access.PREDICT."""
    return GRPC_ACCESS.get(method_name.rsplit("/", 1)[-1], Access.AUTHENTICATED)
