"""Secrets on disk: the cluster secret (`shoal token create`), and the modes of the data dir.

The data dir is 0700 and every secret in it 0600 (`protect_data_dir`, at each start);
the cluster secret is a token `shoal-ct-` + 160 random bits in base32, and nothing
shorter is taken for one (`is_token`).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from pathlib import Path

from shoal.mesh.identity import KEY_FILE
from shoal.private_files import PRIVATE_DIR, PRIVATE_FILE, tighten
from shoal.trust.keys import KEYS_FILE
from shoal.trust.store import STORE_FILE

SECRET_FILE = "cluster_secret"
PREFIX = "shoal-ct-"
# What new_secret makes is 32 characters (160 bits); 26 (130 bits) is the least taken,
# far beyond guessing offline, so a short string typed in place of a token is refused.
MIN_TOKEN_CHARS = 26
_TOKEN = re.compile(re.escape(PREFIX) + f"[a-z2-7]{{{MIN_TOKEN_CHARS},}}")
# The node's key, the cluster secret, its pairings and the hashes of its API keys.
PRIVATE_FILES = (KEY_FILE, SECRET_FILE, STORE_FILE, KEYS_FILE)


def new_secret() -> str:
    return PREFIX + base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=").lower()


def is_token(text: str) -> bool:
    """Whether `text` looks like a token `new_secret` made."""
    return _TOKEN.fullmatch(text) is not None


def protect_data_dir(data_dir: Path) -> None:
    """Make the data dir 0700 and its secrets 0600, warning about each one that was not."""
    data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    tighten(data_dir, PRIVATE_DIR)
    for name in PRIVATE_FILES:
        tighten(data_dir / name, PRIVATE_FILE)


def read_secret(data_dir: Path) -> str | None:
    path = data_dir / SECRET_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_secret(data_dir: Path, secret: str) -> None:
    data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    temp = path.with_name(path.name + ".new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # a leftover temporary file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    os.replace(temp, path)
