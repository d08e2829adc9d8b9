"""Atomic file writes: several worker processes (and a Triton server) read what one of them writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` into a temp file beside ``target``, then rename it into place.

    Readers see the old file or the new one, never half of one. The file is made world-readable: mkstemp makes
    it private, and every worker (and a Triton server) must read it.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
