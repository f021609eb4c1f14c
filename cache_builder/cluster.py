"""Joining a Ray cluster, for the distributed build (`cache_builder.ray_build`) and the shard servers
(`dashboard.distributed`): one place that knows addresses, loopback-only local clusters and clear errors.

Ray is imported only when a cluster is asked for (`--ray`, `VFS_RAY_ADDRESS`): the single-machine build and
search do not need it installed.
"""

from __future__ import annotations

import os
import socket

from cache_builder.cache_format import CacheError

LOCAL = "local"  # `--ray` without an address: a Ray instance on this machine, on loopback
CONNECT_TIMEOUT_S = 3.0


class ClusterError(CacheError):
    """A cluster that cannot do the work: unreachable, without shared storage, or with a shard its actors cannot
    serve (named)."""


def connect(address: str | None = LOCAL) -> None:
    """Join the Ray cluster at `address` ("host:port", "ray://host:port" or "auto"), or start one on this
    machine's loopback (`local`/None); already connected: nothing to do. An unreachable address is one clear
    error within seconds (Ray itself retries for minutes)."""
    check_address(address)
    ray = ray_module()
    if ray.is_initialized():
        return
    if address in (None, "", LOCAL):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1, not the LAN address
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"could not join the Ray cluster at {address}: {exc}") from None


def check_address(address: str | None) -> None:
    """ClusterError unless something listens at `address` (local and auto need no check)."""
    if address in (None, "", LOCAL, "auto"):
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                           "`ray start --head` or check the address") from None


def _host_port(address: str) -> tuple[str, int]:
    bare = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def ray_module():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray and VFS_RAY_ADDRESS need Ray: `pip install 'ray[data]'`") from None
    return ray
