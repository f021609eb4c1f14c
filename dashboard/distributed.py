"""Shards served by long-lived Ray actors: a search fans out to them and merges their answers.

Each `ShardServer` actor memory-maps one shard of the cache (the cache folder must be on storage every node sees)
and answers the four shard calls of `dashboard.shards` with the same kernel and first-stage index as a local
search. `RayShards` is the `ShardSearch` that asks them: the driver (the app, the CLI) keeps the metadata, the
filters, the shortlist and the ranking, so hits, scores and charts are the ones a local search of the same cache
gives. Actors are spread over the nodes (shard i on alive node i mod n), hold no CPU reservation (a shard server
is idle between queries; the kernel uses the node's cores while it scores), and are replaced when one dies: the
call it was answering is asked once more of its replacement, then the search fails with a message naming the
shard.

Ray is imported only here, only when a cluster is asked for (`--ray`, `VFS_RAY_ADDRESS`): the app and the
single-machine search do not need it installed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError
from cache_builder.cluster import LOCAL, ClusterError, check_address, connect, ray_module as _ray

__all__ = ["LOCAL", "RAY_ADDRESS_ENV", "ClusterError", "RayShards", "ShardServer", "check_address", "connect",
           "ray_address", "serve"]
from dashboard.region_query import RegionQuery
from dashboard.shards import CacheShard, ShardSearch, describe

RAY_ADDRESS_ENV = "VFS_RAY_ADDRESS"


def ray_address() -> str | None:
    """The cluster the app serves its shards from (`VFS_RAY_ADDRESS`), None to search in this process."""
    return os.environ.get(RAY_ADDRESS_ENV) or None


class ShardServer:
    """One shard, memory-mapped in a Ray worker; its methods run one at a time (a Ray actor's calls queue)."""

    def __init__(self, cache_path: str, number: int, layer: str | None = None, faults: str | None = None) -> None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # the kernel's threads: Ray gives a 0-CPU actor one
        path = Path(cache_path)
        manifest = fmt.read_manifest(path)
        fmt.check_manifest(manifest, path)
        manifest = manifest.at_layer(layer)
        locations = fmt.shard_locations(path, manifest)
        self.shard = CacheShard.open(locations[number], manifest)
        self.faults = Path(faults) if faults else None

    def call(self, operation: str, query: RegionQuery, ids: np.ndarray | None, backend: str | None):
        if self.faults is not None:  # fault injection for the tests of the retry path
            crash = self.faults / f"crash-{self.shard.location.number}"
            if crash.exists():
                crash.unlink()
                os._exit(1)
        return self.shard.call(operation, query, ids, backend)

    def where(self) -> str:
        import ray

        context = ray.get_runtime_context()
        return f"Ray actor on node {context.get_node_id()[:8]} ({socket.gethostname()}, pid {os.getpid()})"


class RayShards(ShardSearch):
    """The cache's shards (of one layer), each served by a Ray actor; `connect` first."""

    def __init__(self, cache_path: Path, locations: list[fmt.ShardLocation], faults: str | None = None,
                 layer: str | None = None) -> None:
        super().__init__(locations)
        self.cache_path = str(cache_path)
        self.faults = faults
        self.layer = layer
        ray = _ray()
        self._remote = ray.remote(ShardServer)
        self.actors = {location.number: self._start(location.number) for location in locations}
        self.where = {number: self._answer(number, actor.where.remote(), lambda replacement: replacement.where.remote())
                      for number, actor in self.actors.items()}

    def _start(self, number: int):
        """Shard `number`'s actor, on the alive nodes in turn (shard i on node i mod n, sorted by id). The
        affinity is hard: Ray 2.60 treats a soft one as a hint, and put all 4 actors on one node of two in 4
        tries of 15 (SPREAD is best-effort too). A node gone since makes the actor unschedulable, and `_answer`
        replaces it on the nodes alive then."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
        strategy = (NodeAffinitySchedulingStrategy(nodes[number % len(nodes)], soft=False) if nodes else "SPREAD")
        return self._remote.options(num_cpus=0, max_restarts=0, scheduling_strategy=strategy).remote(
            self.cache_path, number, self.layer, self.faults)

    def _answer(self, number: int, pending, again):
        """The answer to the call `pending` of shard `number`'s actor. If the actor died (or could not start), it
        is replaced and asked once more (`again(replacement)`); a second failure names the shard."""
        ray = _ray()
        location = self.locations[number]
        for attempt in (1, 2):
            try:
                return ray.get(pending)
            except ray.exceptions.RayTaskError as exc:  # the call raised: a refusal (bad ids, no index...)
                raise _named(location, exc.cause if isinstance(exc.cause, Exception) else exc) from None
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
                error = exc  # the actor died, its shard could not be opened, or its node is gone
            if attempt == 2:
                raise ClusterError(f"{describe(location)} could not be served: its Ray actor failed twice "
                                   f"({_actor_failure(error, location)}); the search was not answered") from None
            self._replace(number)
            pending = again(self.actors[number])
        raise AssertionError("unreachable")

    def _replace(self, number: int) -> None:
        ray = _ray()
        try:
            ray.kill(self.actors[number], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[number] = self._start(number)

    def ask(self, operation, query, parts, backend):
        ray = _ray()
        query_ref = ray.put(query)
        pending = {number: self.actors[number].call.remote(operation, query_ref, ids, backend)
                   for number, ids in parts.items()}  # every shard's call in flight before any answer is awaited
        return {number: self._answer(number, pending[number],
                                     lambda actor, ids=ids: actor.call.remote(operation, query_ref, ids, backend))
                for number, ids in parts.items()}

    def placement(self) -> list[str]:
        return [f"{describe(self.locations[number])}: {self.where.get(number, 'replaced')}"
                for number in sorted(self.actors)]

    def close(self) -> None:
        ray = _ray()
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or the cluster is
                pass


def _named(location: fmt.ShardLocation, cause: Exception) -> Exception:
    """An error raised while serving a shard, with the shard named (same type, so callers handle it alike)."""
    if isinstance(cause, CacheError) and "shard" not in str(cause):
        return type(cause)(f"{describe(location)}: {cause}") if type(cause) is CacheError else cause
    return cause


def _actor_failure(error: Exception, location: fmt.ShardLocation) -> str:
    """What killed an actor, in one line: the error its shard raised when opened, else how it died."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if "Error: " in line and not line.startswith(("File ", "raise "))]
    reason = raised[-1].split("Error: ", 1)[1] if raised else (lines[-1] if lines else type(error).__name__)
    return reason.removeprefix(f"{describe(location)}: ")[:300]


def serve(cache, address: str | None = LOCAL, faults: str | None = None):
    """`cache` with its shards served by Ray actors on the cluster at `address` (see `connect`)."""
    connect(address)
    return cache.served_by(RayShards(cache.path, [shard.location for shard in cache.shards], faults,
                                     cache.manifest.layer))
