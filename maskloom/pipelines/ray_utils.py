"""Ray at the edge: starting/connecting Ray and the resource settings of a job, built in one place.

Embedded default: with no address (no ``address`` argument and no ``RAY_ADDRESS``), a private
local Ray is started in-process (``ray.init(address="local")``) so that a job never silently
attaches to a stale cluster left running on the machine. With an address (``--address`` or
``RAY_ADDRESS``, which ``ray job submit`` sets for the job's driver) it connects to that cluster.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RayResources:
    """Resource settings of one Ray Data actor-pool stage."""

    num_workers: int
    """Actors in the pool (tokenizer instances working in parallel)."""
    cpus_per_worker: float
    """CPUs reserved by each actor."""
    gpus_per_worker: float
    """GPUs reserved by each actor (0 on CPU-only machines)."""
    batch_size: int
    """Rows handed to one actor call (one shard spec per call for preprocessing)."""
    object_store_memory: int | None
    """Bytes of the object store of an embedded Ray; None lets Ray choose (30% of RAM)."""
    max_tasks_in_flight: int = 2
    """Calls queued on one actor at a time. With 1, an actor idles for a scheduling round trip after
    every shard (measured ~0.2 s here: a third of a 0.35 s image shard, so two workers reached only
    1.4x one); with 2 the next shard waits on the actor while it works on the current one. Ray Data's
    default (4) lets a slow or late-starting actor hoard shards while another idles at the end of
    the job; 2 bounds that tail to one extra shard."""

    @property
    def threads_per_worker(self) -> int:
        """Intra-op threads (torch, OpenMP, BLAS, Arrow) of one actor: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_worker))

    def map_batches_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Dataset.map_batches(ActorClass, **kwargs)``."""
        import ray.data

        kw: dict[str, Any] = {
            "compute": ray.data.ActorPoolStrategy(
                size=self.num_workers, max_tasks_in_flight_per_actor=self.max_tasks_in_flight
            ),
            "batch_size": self.batch_size,
            "num_cpus": self.cpus_per_worker,
        }
        if self.gpus_per_worker:
            kw["num_gpus"] = self.gpus_per_worker
        return kw


def _available(kind: str) -> float:
    """CPUs or GPUs of the connected Ray cluster, or of this machine when Ray is not running."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get(kind, 0.0))
    if kind == "CPU":
        try:
            return float(len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - macOS/Windows
            return float(os.cpu_count() or 1)
    return 0.0


def resources(
    num_workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    batch_size: int | None = None,
    object_store_memory: int | None = None,
    *,
    max_workers: int | None = None,
) -> RayResources:
    """Resource settings with defaults derived from the cluster (or machine).

    Defaults: one CPU and no GPU per worker, as many workers as the CPUs allow (at least one,
    at most ``max_workers``, e.g. the number of shards), one row per call.
    """
    cpus = 1.0 if cpus_per_worker is None else float(cpus_per_worker)
    gpus = 0.0 if gpus_per_worker is None else float(gpus_per_worker)
    if cpus <= 0 or gpus < 0:
        raise ValueError(f"cpus_per_worker must be > 0 and gpus_per_worker >= 0, got {cpus}, {gpus}")
    if num_workers is None:
        n = int(_available("CPU") // cpus)
        if gpus:
            n = min(n, int(_available("GPU") // gpus))
        num_workers = max(1, n)
        if max_workers is not None:
            num_workers = max(1, min(num_workers, max_workers))
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    bs = 1 if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    return RayResources(
        num_workers=int(num_workers),
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        batch_size=bs,
        object_store_memory=object_store_memory,
    )


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
"""Environment variables read by OpenMP / BLAS runtimes when they start (before their first use)."""


def _set_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set environment variables; return their previous values (None: unset) for ``_restore_env``."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore_env(old: dict[str, str | None]) -> None:
    """Undo ``_set_env``."""
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def limit_threads(n: int) -> dict[str, Any]:
    """Run this process's numeric libraries with ``n`` intra-op threads; return the previous settings.

    A 1-CPU actor that lets torch (or OpenMP/BLAS, or Arrow's pool) start one thread per core
    oversubscribes the machine as soon as two actors run. Sets the OpenMP/BLAS environment variables
    (for runtimes not yet started), the BLAS/OpenMP pools already loaded (numpy's OpenBLAS reads its
    variable only when numpy is imported, which Ray does before an actor's code runs; an unlimited
    pool spins a thread per core after every BLAS call) through ``threadpoolctl``,
    ``torch.set_num_threads`` when torch is imported, and Arrow's CPU pool. Call it again after
    importing torch (tokenizers import it lazily). ``restore_threads`` undoes it (for a benchmark's
    in-process baseline).
    """
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    env = {k: str(n) for k in THREAD_ENV_VARS}
    # Hugging Face tokenizers (the text tokenizer's BPE) encodes batches on a rayon pool of a thread
    # per core, sized when first used, and reads TOKENIZERS_PARALLELISM on every call. One thread:
    # no pool at all (measured: after the text tokenizer had run, a process's later single-threaded
    # work ran 15 % slower with its pool, even a pool of one, and at full speed without it).
    env["RAYON_NUM_THREADS"] = str(n)
    env["TOKENIZERS_PARALLELISM"] = "false" if n == 1 else "true"
    old: dict[str, Any] = {"env": _set_env(env)}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        old["torch"] = torch.get_num_threads()
        torch.set_num_threads(n)
    if "pyarrow" in sys.modules:
        pa = sys.modules["pyarrow"]
        old["arrow"] = pa.cpu_count()
        pa.set_cpu_count(n)
    from threadpoolctl import threadpool_limits

    old["pools"] = threadpool_limits(limits=n, user_api="blas")  # BLAS pools loaded so far (OpenMP: torch)
    return old


def restore_threads(old: dict[str, Any]) -> None:
    """Undo ``limit_threads`` (``old`` is its return value)."""
    _restore_env(old.get("env", {}))
    if "pools" in old:
        old["pools"].restore_original_limits()
    if "torch" in old:
        sys.modules["torch"].set_num_threads(old["torch"])
    if "arrow" in old:
        sys.modules["pyarrow"].set_cpu_count(old["arrow"])


WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""Ray's setting (an environment variable read when Ray starts) of the niceness its worker processes
take: 15 by default, so that the raylet and GCS win the CPU over tasks and actors. An embedded Ray
runs one job on the user's machine, where niceness 15 makes the tokenizer actors yield to every other
process (on the 2-core test machine two actors spent 5-8 % more per input than with 0, preempted by
the driver and Ray's own processes: 12.8 -> 11.8 s for a 42,000-clip audio job); so ``init_ray``
starts it with 0, the niceness of a plain loop (unless the variable is set). Ray's job supervisor
sets the same for its own actor. A cluster keeps its own setting."""


class RayConnectError(ConnectionError):
    """No Ray cluster answers at the given address (checked before ``ray.init``, which would retry
    for minutes)."""


_CONNECT_HINT = (
    "start one with `ray start --head`, or leave out --address (and RAY_ADDRESS) for an embedded Ray"
)

CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for a cluster's GCS port to accept a connection before giving up."""


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayConnectError unless something listens at a ``host:port`` address.

    ``ray.init`` on an address where nothing listens logs "Failed to connect to GCS" and keeps
    retrying (over 3 minutes here) instead of failing. Other forms (``auto``, ``ray://...`` for Ray
    Client, ``local``) are left to Ray, which fails fast for them."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectError(f"Ray address {address!r}: expected HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = (
            f"no answer within {timeout:g} s"
            if isinstance(e, TimeoutError)
            else (e.strerror or str(e)).lower()
        )
        raise RayConnectError(f"no Ray cluster at {address} ({reason}); {_CONNECT_HINT}") from None


def resolve_address(address: str | None = None) -> str:
    """The address to connect to: ``address``, else ``RAY_ADDRESS``, else ``"local"`` (embedded)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    include_dashboard: bool | None = False,
    runtime_env: dict[str, Any] | None = None,
    quiet: bool = True,
) -> bool:
    """Start or connect to Ray; return True when this call did it (so the caller shuts it down).

    Already initialised -> reuse (returns False). ``address`` None and no ``RAY_ADDRESS`` -> a new
    local Ray with ``num_cpus``/``num_gpus``/``object_store_memory``; otherwise connect to the
    cluster (those three are the cluster's business and are ignored). ``include_dashboard`` stays
    available (Ray Train wants it). A cluster with token authentication needs
    ``RAY_AUTH_MODE=token`` and the cluster's token (``~/.ray/auth_token``) in the environment.
    """
    import ray

    if ray.is_initialized():
        return False
    target = resolve_address(address)
    kw: dict[str, Any] = {
        "address": target,
        "include_dashboard": include_dashboard,
        "logging_level": logging.WARNING if quiet else logging.INFO,
        "log_to_driver": True,
        "runtime_env": runtime_env,
    }
    env: dict[str, str] = {}
    if target == "local":
        kw.update(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory)
        log.info("starting an embedded local Ray (num_cpus=%s)", num_cpus)
        if WORKER_NICENESS_ENV not in os.environ:
            env[WORKER_NICENESS_ENV] = "0"
    else:
        check_reachable(target)
        if num_cpus is not None or num_gpus is not None or object_store_memory is not None:
            log.info("connecting to %s: num_cpus/num_gpus/object_store_memory are the cluster's", target)
        log.info("connecting to the Ray cluster at %s", target)
    old = _set_env(env)  # read by the raylet this starts, and so by the workers it starts
    try:
        ray.init(**kw)
    except ConnectionError as e:  # something listens there, but not a Ray that lets us in
        if isinstance(e, RayConnectError):
            raise
        raise RayConnectError(
            f"cannot connect to a Ray cluster at {target}: {e} (a cluster with token authentication "
            "needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token: see the README)"
        ) from None
    finally:
        _restore_env(old)
    if quiet:
        import ray.data  # noqa: F401  (configures its loggers on import; quiet them afterwards)

        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return True


RAY_DATA_BAR_NOTICE = "Progress bars disabled"
"""Start of the warning Ray Data logs once per process when its progress bars are turned off."""

RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
"""The logger that warning goes through (a logger name: nothing of Ray's internals is imported)."""


class _DropBarNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RAY_DATA_BAR_NOTICE)


def quiet_ray_data_bars() -> None:
    """Turn Ray Data's own progress bars off, without its warning that they are off.

    maskloom draws its own bar (shards done, errors), so Ray Data's operator bars would only
    interleave with it, and its advice "Progress bars disabled. To enable, set ..." would be noise
    in every job's output. Only that one message is dropped (a filter on its logger); any other
    warning still shows. Idempotent."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logger = logging.getLogger(RAY_DATA_PROGRESS_LOGGER)
    if not any(isinstance(f, _DropBarNotice) for f in logger.filters):
        logger.addFilter(_DropBarNotice())


def shutdown_ray(started: bool) -> None:
    """Shut Ray down if ``init_ray`` started it (``started`` is its return value)."""
    import ray

    if started and ray.is_initialized():
        ray.shutdown()
