"""API keys for clients on the network, kept hashed in `api_keys.json` in the data dir.

A key is `shoal-sk-` followed by 32 random bytes in URL-safe base64. The file keeps,
per key, only a public ID (the first 8 characters after the prefix, shown to people
and used to find the record), a name, the creation time and the SHA-256 of the key.

Why a plain SHA-256 and not scrypt/PBKDF2: slow KDFs exist to make guessing *low
entropy* passwords from a stolen hash expensive. These keys are 256 random bits, which
no amount of guessing finds, so a fast hash loses nothing, and it keeps checking a key
cheap enough to do on every request. Comparison is constant time (`hmac.compare_digest`).

The file is written atomically (a temp file and `os.replace`) with mode 0600, and
changes by other processes (`shoal keys revoke` while the node serves) are seen on the
next check: the store re-reads the file whenever its inode, mtime or size changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError

KEYS_FILE = "api_keys.json"
KEY_PREFIX = "shoal-sk-"
ID_LENGTH = 8  # characters of the key after the prefix: 48 bits, public
_FORMAT_VERSION = 1
_MAX_NAME = 64
# Compared against when no record has the presented ID, so a miss costs what a hit does.
_DUMMY_DIGEST = hashlib.sha256(b"shoal: no such key").digest()


class KeyNameError(ValueError):
    """A name `create` refuses: empty, too long, unprintable, taken, or a key itself."""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    created: str  # ISO 8601, UTC
    sha256: str  # hex digest of the whole key; never shown
    # Its share when a model's holders are busy and requests queue (weighted fair
    # queuing, `shoal.routing.scheduler`); None: as this node's own clients (70).
    weight: float | None = None

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the hash."""
        shown: dict[str, Any] = {"id": self.id, "name": self.name, "created": self.created}
        if self.weight is not None:
            shown["weight"] = self.weight
        return shown


def key_id(secret: str) -> str | None:
    """The public ID inside a key, or None if it is not shaped like one of ours."""
    if not secret.startswith(KEY_PREFIX) or len(secret) < len(KEY_PREFIX) + ID_LENGTH:
        return None
    return secret[len(KEY_PREFIX) : len(KEY_PREFIX) + ID_LENGTH]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: tuple[KeyRecord, ...] = ()
        self._signature: tuple[int, int, int] | None = None  # inode, mtime_ns, size

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> KeyStore:
        return cls(data_dir / KEYS_FILE)

    # -- reading ------------------------------------------------------------------------

    def records(self) -> tuple[KeyRecord, ...]:
        """Every key, oldest first, as the file says now. ConfigError if it is corrupt."""
        self._refresh()
        return self._records

    def list(self) -> tuple[KeyRecord, ...]:
        return self.records()

    def verify(self, secret: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key, else None. Constant time per record."""
        presented = _digest(secret)
        wanted = key_id(secret)
        found: KeyRecord | None = None
        compared = False
        for record in self.records():
            if record.id != wanted:  # the ID is public: no need to hide how it compares
                continue
            compared = True
            if hmac.compare_digest(presented, bytes.fromhex(record.sha256)):
                found = record
        if not compared:
            hmac.compare_digest(presented, _DUMMY_DIGEST)
        return found

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._records, self._signature = (), None
            return
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if signature == self._signature:
            return
        if stat.st_mode & 0o077:
            with contextlib.suppress(OSError):
                self.path.chmod(0o600)  # tighten what a copy or an editor loosened
        self._records = self._parse(self._read())
        self._signature = signature

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None

    def _parse(self, raw: bytes) -> tuple[KeyRecord, ...]:
        try:
            document = json.loads(raw)
            if document.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unknown version {document.get('version')!r}")
            records = tuple(_record(item) for item in document["keys"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The message names the problem, never the file's content.
            reason = type(exc).__name__ if isinstance(exc, KeyError) else str(exc)[:120]
            raise ConfigError(
                f"{self.path} is not a valid API key file ({reason}); fix it, or delete it "
                "to revoke every key"
            ) from None
        return records

    # -- changing -----------------------------------------------------------------------

    def create(self, name: str, weight: float | None = None) -> tuple[KeyRecord, str]:
        """A new key named `name`: its record, and the key itself (shown once, kept nowhere)."""
        name = _checked_name(name)
        weight = _checked_weight(weight)
        with self._locked():
            records = self.records()
            if any(r.name == name for r in records):
                raise KeyNameError(f"a key named {name!r} exists already")
            taken = {r.id for r in records}
            while True:
                secret = KEY_PREFIX + secrets.token_urlsafe(32)
                ident = key_id(secret)
                # An ID starting with '-' would read as an option: `shoal keys revoke -x…`.
                if ident is not None and ident not in taken and not ident.startswith("-"):
                    break
            record = KeyRecord(
                id=ident,
                name=name,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                sha256=_digest(secret).hex(),
                weight=weight,
            )
            self._write((*records, record))
        return record, secret

    def revoke(self, id_or_name: str) -> KeyRecord | None:
        """Delete the key with this ID (or, failing that, this name); None if none has it.

        The node sees the change on its next check: a revoked key fails at once.
        """
        with self._locked():
            records = self.records()
            match = next((r for r in records if r.id == id_or_name), None) or next(
                (r for r in records if r.name == id_or_name), None
            )
            if match is not None:
                self._write(tuple(r for r in records if r is not match))
        return match

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: two `shoal keys create` at once must not lose a key."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as exc:
            raise ConfigError(f"cannot write in {self.path.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, records: tuple[KeyRecord, ...]) -> None:
        document = {
            "version": _FORMAT_VERSION,
            "keys": [
                {
                    "id": r.id,
                    "name": r.name,
                    "created": r.created,
                    "sha256": r.sha256,
                    **({"weight": r.weight} if r.weight is not None else {}),
                }
                for r in records
            ],
        }
        data = json.dumps(document, indent=2).encode() + b"\n"
        temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None
        self._records = records
        stat = self.path.stat()
        self._signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _record(item: Any) -> KeyRecord:
    fields = {key: item[key] for key in ("id", "name", "created", "sha256")}
    if not all(isinstance(value, str) for value in fields.values()):
        raise ValueError("a key entry has a field that is not text")
    if len(bytes.fromhex(fields["sha256"])) != hashlib.sha256().digest_size:
        raise ValueError("a key entry has a hash of the wrong size")
    weight = item.get("weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError("a key entry has a weight that is not a number")
        weight = _checked_weight(float(weight))
    return KeyRecord(**fields, weight=weight)


def _checked_weight(weight: float | None) -> float | None:
    if weight is not None and not 0 < weight <= 1e6:  # NaN fails too
        raise ValueError("a key's weight is a number above 0 and at most 1000000")
    return weight


def _checked_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise KeyNameError("a key needs a name (who or what will use it)")
    if len(name) > _MAX_NAME:
        raise KeyNameError(f"a key name is at most {_MAX_NAME} characters")
    if not name.isprintable():
        raise KeyNameError("a key name must be printable text")
    if name.startswith(KEY_PREFIX):
        # Names are stored in the clear: a pasted key must not end up there.
        raise KeyNameError(f"a key name must not start with {KEY_PREFIX!r}")
    return name
