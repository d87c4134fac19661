"""kernel_cache: numba's cached kernels go when any source of the package changes."""

from __future__ import annotations

import os
from pathlib import Path

from cluster.selector import index_kernels
from cluster.selector.kernel_cache import ensure_fresh, source_digest


class _Dispatcher:
    def __init__(self, cache_dir: Path) -> None:
        self._cache = type("Cache", (), {"_cache_path": str(cache_dir)})()


def test_stale_kernels_are_deleted_once_and_others_left(tmp_path: Path) -> None:
    src, cache = tmp_path / "pkg", tmp_path / "pkg" / "__pycache__"
    cache.mkdir(parents=True)
    (src / "a_kernel.py").write_text("x = 1\n")
    (src / "b_kernel.py").write_text("y = 2\n")
    for name in ("a.f-1.py311.nbi", "a.f-1.py311.1.nbc", "a.cpython-311.pyc"):
        (cache / name).write_text("old")
    d = _Dispatcher(cache)
    assert ensure_fresh(d, src)  # no stamp yet: whatever is there is of unknown sources
    assert sorted(p.name for p in cache.iterdir()) == ["a.cpython-311.pyc",
                                                       "tinyserve-kernels.sha256"]
    (cache / "a.f-1.py311.nbi").write_text("new")
    assert not ensure_fresh(d, src)  # same sources: the new cache stays
    assert (cache / "a.f-1.py311.nbi").exists()
    (src / "b_kernel.py").write_text("y = 3\n")  # NOTE: another file than the cached kernel's
    assert ensure_fresh(d, src)
    assert not (cache / "a.f-1.py311.nbi").exists()


def test_the_digest_covers_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("1")
    first = source_digest(tmp_path)
    (tmp_path / "a.py").write_text("2")
    second = source_digest(tmp_path)
    (tmp_path / "a.py").rename(tmp_path / "b.py")
    assert len({first, second, source_digest(tmp_path)}) == 3


def test_the_package_stamp_matches_its_sources_after_import() -> None:
    cache_dir = Path(index_kernels._home._cache._cache_path)
    assert os.access(cache_dir, os.W_OK)  # NOTE: a dev install caches beside the sources
    stamp = cache_dir / "tinyserve-kernels.sha256"
    assert stamp.read_text() == source_digest(Path(index_kernels.__file__).parent)
