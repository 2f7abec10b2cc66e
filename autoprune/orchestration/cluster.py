"""The Ray cluster of a search: joining or starting it, and refusing at once what it cannot run.

A bad `--ray-address`, a cluster nothing answers on, or a trial asking for more GPUs or CPUs
than any node has would otherwise make Ray retry or wait for many minutes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import UserError
from .options import SearchOptions

log = logging.getLogger("autoprune")


def tune_storage(opts: SearchOptions, study_dir: Path) -> str:
    """Where Tune keeps trial results and checkpoints: `--tune-storage` (a shared path or an
    object store URI such as s3://bucket/prefix, per study) or `<out>/<study>/tune`."""
    if opts.tune_storage:
        if "://" in opts.tune_storage:
            return opts.tune_storage.rstrip("/") + "/" + study_dir.name
        return str(Path(opts.tune_storage).expanduser().resolve() / study_dir.name)
    return str(study_dir / "tune")


def init_ray(opts: SearchOptions) -> None:
    """Join `--ray-address` or start a local Ray; then refuse what its nodes cannot run."""
    import ray

    # Tune's new output engine prints an experiment banner even at verbose=0: a trial count of
    # 9223372036854775807 for an open-ended search and a TensorBoard command for logs we do not
    # write. The search reports its own progress; the old engine at verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        check_gpus(opts)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if opts.ray_address:
        _probe(opts.ray_address)
        try:
            ray.init(address=opts.ray_address, log_to_driver=False,
                     logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the Ray cluster at {opts.ray_address}: "
                            f"{str(exc).strip().splitlines()[0]}") from None
    else:
        # address="local": a new local instance even where `ray start` left one running
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level="warning")
    log.info("ray: %g CPUs, %g GPUs", ray.cluster_resources().get("CPU", 0),
             ray.cluster_resources().get("GPU", 0))
    check_gpus(opts)


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a --ray-address; None for `auto`; a `UserError` for anything else."""
    if address == "auto":
        return None
    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379) "
                        f"or auto")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float = 10.0) -> None:
    """Refuse an address nothing listens on: `ray.init` would retry it for many minutes."""
    import socket

    target = host_port(address)
    if target is None:
        return  # Ray looks for a cluster started on this node and says so if there is none
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot join the Ray cluster at {address}: nothing answers there "
                        f"({exc.strerror or exc}); is `ray start --head` running?") from None


def largest_node_cpus() -> float | None:
    """The CPUs of the cluster's largest live node: what one single-process task (a
    finalist) can be given at most; None when Ray reports no node."""
    import ray

    cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(cpus) if cpus else None


def check_gpus(opts: SearchOptions) -> None:
    """Refuse at once what no node of the cluster can ever run (Tune would wait forever)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if opts.gpus_per_trial > 0 and not any(n.get("GPU", 0) >= opts.gpus_per_trial
                                           for n in nodes):
        raise UserError(f"--gpus-per-trial {opts.gpus_per_trial:g} asked, but no node of the Ray "
                        f"cluster has that many GPUs ({total_gpus:g} GPUs in all); use "
                        f"--gpus-per-trial 0 or a cluster with GPUs")
    if not any(n.get("CPU", 0) >= opts.cpus_per_trial for n in nodes):
        biggest = max((n.get("CPU", 0) for n in nodes), default=0)
        raise UserError(f"--cpus-per-trial {opts.cpus_per_trial:g} asked, but the largest node of "
                        f"the Ray cluster has {biggest:g} CPUs")
