"""Managed API keys: a SQLite file of keys, each with a name, optional per-minute
limits and an optional expiry, stored only as salted hashes.

A key reads ``zse_<id>_<secret>``: the id (8 hex digits) is public and names the key
in ``zse keys list`` and ``zse keys revoke``; the secret is 256 random bits, shown
once at creation. Keys carry that much entropy, so one salted SHA-256 per check is
as safe as a slow password hash and costs microseconds. Every check reads the file,
so a key revoked or expired by ``zse keys`` is refused at once by a running server.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0
)
"""

_PREFIX = "zse_"


def default_path() -> Path:
    """Where keys live unless ``--keys-db`` says otherwise."""
    return Path(platformdirs.user_data_dir("zse")) / "keys.db"


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    rpm: int | None
    tpm: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    requests: int
    tokens: int

    @property
    def prefix(self) -> str:
        """What a key starts with: enough to recognise it, nothing to use it."""
        return f"{_PREFIX}{self.id}_"

    def state(self, now: float | None = None) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        now = time.time() if now is None else now
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


class KeyStore:
    """The keys in one SQLite file (created with its directory on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # A connection per operation: the server checks keys from worker threads,
        # and `zse keys` in another process writes the same file.
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:
                yield db
        finally:
            db.close()

    def create(
        self,
        name: str = "",
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        expires_in_days: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself (never stored, shown once)."""
        for label, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise ValueError(f"invalid value for '{label}': {value} must be >= 1")
        if expires_in_days is not None and expires_in_days <= 0:
            raise ValueError(f"invalid value for 'expires_in_days': {expires_in_days} must be > 0")
        now = time.time()
        expires = now + expires_in_days * 86400 if expires_in_days is not None else None
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._db() as db:
            while True:
                key_id = secrets.token_hex(4)
                try:
                    db.execute(
                        "INSERT INTO keys (id, name, salt, hash, rpm, tpm, created_at,"
                        " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (key_id, name, salt, _digest(salt, secret), rpm, tpm, now, expires),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue  # an id already taken: draw another
        record = self.get(key_id)
        assert record is not None
        return record, f"{_PREFIX}{key_id}_{secret}"

    def get(self, key_id: str) -> KeyRecord | None:
        with self._db() as db:
            row = db.execute(
                "SELECT id, name, rpm, tpm, created_at, expires_at, revoked_at,"
                " last_used_at, requests, tokens FROM keys WHERE id = ?",
                (key_id,),
            ).fetchone()
        return KeyRecord(*row) if row else None

    def list(self) -> list[KeyRecord]:
        with self._db() as db:
            rows = db.execute(
                "SELECT id, name, rpm, tpm, created_at, expires_at, revoked_at,"
                " last_used_at, requests, tokens FROM keys ORDER BY created_at"
            ).fetchall()
        return [KeyRecord(*r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        """Revokes a key by id (or by the key's prefix); False if there is none."""
        key_id = key_id.removeprefix(_PREFIX).rstrip("_")
        with self._db() as db:
            cur = db.execute(
                "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            if cur.rowcount:
                return True
        return self.get(key_id) is not None  # already revoked: still a success

    def verify(self, key: str) -> tuple[KeyRecord | None, str]:
        """The record of ``key`` and its state (``active``, ``revoked``, ``expired``),
        or (None, ``invalid``) for anything that is not a stored key."""
        rest = key.removeprefix(_PREFIX)
        key_id, sep, secret = rest.partition("_")
        if not key.startswith(_PREFIX) or not sep or not secret:
            return None, "invalid"
        with self._db() as db:
            row = db.execute("SELECT salt, hash FROM keys WHERE id = ?", (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(_digest(row[0], secret), row[1]):
            return None, "invalid"
        record = self.get(key_id)
        if record is None:
            return None, "invalid"
        return record, record.state()

    def record_use(self, key_id: str, tokens: int) -> None:
        """Counts one request and its tokens against the key."""
        with self._db() as db:
            db.execute(
                "UPDATE keys SET last_used_at = ?, requests = requests + 1,"
                " tokens = tokens + ? WHERE id = ?",
                (time.time(), tokens, key_id),
            )
