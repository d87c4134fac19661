"""numba's on-disk cache of the selection service's kernels, kept in step with their sources.

NOTE: numba checks a cached kernel only against its own file's timestamp, yet the machine code
it stores also holds every kernel it calls from other files. After an edit to
``objective_kernel.py`` alone, ``select_kernel.select_bound`` went on running the old
arithmetic from its cache until the cache was deleted by hand. So: a digest of every source
file of this package is kept beside the cache; when it differs (any edit, an upgrade), the
cached kernels are deleted once, before any of them is loaded, and rebuilt at first use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_STAMP = "tinyserve-kernels.sha256"


def source_digest(package_dir: Path) -> str:
    """sha256 over the names and contents of ``package_dir``'s ``*.py`` files."""
    h = hashlib.sha256()
    for path in sorted(package_dir.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def ensure_fresh(dispatcher: Any, package_dir: Path) -> bool:
    """Delete numba's cached kernels in ``dispatcher``'s cache directory (every kernel of the
    package shares it) when they were built from other sources than ``package_dir``'s now;
    True when it deleted. A cache directory that cannot be written is left alone (numba then
    compiles in memory)."""
    cache = getattr(dispatcher, "_cache", None)
    cache_dir = Path(getattr(cache, "_cache_path", "") or "")
    if not cache_dir.is_dir():
        return False
    digest = source_digest(package_dir)
    stamp = cache_dir / _STAMP
    try:
        if stamp.is_file() and stamp.read_text() == digest:
            return False
        for path in cache_dir.iterdir():
            # NOTE: numba's index (.nbi) and object (.nbc) files; Python's .pyc stay.
            if path.suffix in (".nbi", ".nbc"):
                path.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:
        return False
    return True
