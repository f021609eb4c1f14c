"""Every environment variable in one object (dashboard.settings)."""

from __future__ import annotations

from pathlib import Path

from dashboard.settings import DEFAULT_CACHES_DIR, DEFAULT_KERNEL_DIR, Settings


def test_unset_or_blank_variables_mean_the_defaults():
    for environ in ({}, {"VFS_CACHES_DIR": " ", "VFS_SEARCH_BACKEND": "", "VFS_KERNEL_DIR": "", "CC": ""}):
        settings = Settings.from_env(environ)
        assert settings.caches_dir is None and settings.search_backend is None and settings.compiler is None
        assert settings.kernel_dir == DEFAULT_KERNEL_DIR
        assert settings.caches_root() == DEFAULT_CACHES_DIR


def test_the_environment_wins_over_the_configured_caches_folder():
    settings = Settings.from_env({"VFS_CACHES_DIR": "/srv/caches", "VFS_SEARCH_BACKEND": " torch ",
                                  "VFS_KERNEL_DIR": "~/kernels", "CC": "clang"})
    assert settings.caches_root("/from/secrets") == Path("/srv/caches")
    assert settings.search_backend == "torch" and settings.compiler == "clang"
    assert settings.kernel_dir == Path("~/kernels").expanduser()
    assert Settings.from_env({}).caches_root("/from/secrets") == Path("/from/secrets")
