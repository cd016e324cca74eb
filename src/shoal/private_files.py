"""Modes for what only the node's user may read: the data dir 0700, its secrets 0600.

Looser modes are tightened with a warning that names the file and the mode it had, so
the operator learns that a copy, an archive or an editor exposed it to other users.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def tighten(path: Path, mode: int) -> bool:
    """Give `path` no more than `mode` (warning if it had more); False if it is missing."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if current & ~mode:
        path.chmod(current & mode)
        log.warning(
            "%s was mode %s, readable or writable by other users: tightened to %s",
            path, f"{current:04o}", f"{current & mode:04o}",
        )  # fmt: skip
    return True
