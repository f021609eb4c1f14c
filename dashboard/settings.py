"""Every environment variable the dashboard reads, in one object, read when asked (tests may change them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

CACHES_DIR_ENV = "VFS_CACHES_DIR"
SEARCH_BACKEND_ENV = "VFS_SEARCH_BACKEND"
KERNEL_DIR_ENV = "VFS_KERNEL_DIR"
DIRECT_READS_ENV = "VFS_DIRECT_READS"
DEFAULT_CACHES_DIR = Path("caches")
DEFAULT_KERNEL_DIR = Path.home() / ".cache" / "visual-feature-search" / "kernels"


@dataclass(frozen=True)
class Settings:
    caches_dir: Path | None  # $VFS_CACHES_DIR: the folder whose subfolders are caches
    search_backend: str | None  # $VFS_SEARCH_BACKEND: a scorer name (see dashboard.scorers), None = automatic
    kernel_dir: Path  # $VFS_KERNEL_DIR: where the compiled search kernel is kept
    compiler: str | None  # $CC: the C compiler to build the kernel with
    direct_reads: bool = True  # $VFS_DIRECT_READS=0: two-tier reranks read through the memory map (dashboard.row_reads)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ

        def value(name: str) -> str | None:
            return (environ.get(name) or "").strip() or None

        caches = value(CACHES_DIR_ENV)
        kernels = value(KERNEL_DIR_ENV)
        return cls(
            caches_dir=Path(caches).expanduser() if caches else None,
            search_backend=value(SEARCH_BACKEND_ENV),
            kernel_dir=Path(kernels).expanduser() if kernels else DEFAULT_KERNEL_DIR,
            compiler=value("CC"),
            direct_reads=value(DIRECT_READS_ENV) not in ("0", "false", "no", "off"),
        )

    def caches_root(self, configured: str | None = None) -> Path:
        """$VFS_CACHES_DIR, else the folder configured in the app's secrets, else ./caches."""
        if self.caches_dir is not None:
            return self.caches_dir
        return Path(configured).expanduser() if configured else DEFAULT_CACHES_DIR


def current() -> Settings:
    return Settings.from_env()
