"""The cluster secret: made by `shoal token create`, kept in the data dir, mode 0600."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

SECRET_FILE = "cluster_secret"
PREFIX = "shoal-ct-"


def new_secret() -> str:
    return PREFIX + base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=").lower()


def read_secret(data_dir: Path) -> str | None:
    path = data_dir / SECRET_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_secret(data_dir: Path, secret: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    temp = path.with_name(path.name + ".new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    os.replace(temp, path)
