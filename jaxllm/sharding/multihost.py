"""Many processes, one run: joining them (`initialize`), who writes (`is_primary`), and the
few host-level collectives the stages need (barriers, process 0's word, a common count).

One process per host (per GPU node, per TPU VM) runs the same command; `jax.distributed` joins
them, after which `jax.devices()` spans every host and each process feeds its own devices.
Every helper here is a no-op (or the identity) in a single process, so single-host runs pay
nothing and need no coordinator.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxllm.errors import ConfigError

# The environment a launcher sets for a plain (non-cluster) multi-process run; on Cloud TPU,
# SLURM, Open MPI and Kubernetes jax finds all three itself once `distributed: true`.
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(requested: bool = False) -> bool:
    """Joins this process to the others when `distributed: true` or `JAX_COORDINATOR_ADDRESS`
    is set, before anything touches a device; returns whether it did. CPU processes exchange
    collectives over gloo."""
    env = {k: os.environ.get(k, "") for k in ENV_VARS}
    if not requested and not env["JAX_COORDINATOR_ADDRESS"]:
        for k in ENV_VARS[1:]:
            if env[k]:
                raise ConfigError(f"{k} is set but JAX_COORDINATOR_ADDRESS is not; set both")
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs: dict[str, Any] = {}
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if env[name]:
            try:
                kwargs[key] = int(env[name])
            except ValueError:
                raise ConfigError(f"{name}={env[name]!r}: expected an integer") from None
    # CPU processes need a cross-process collective library; the setting touches only the
    # CPU backend, so it is harmless beside TPUs and GPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"distributed: could not join the other processes ({first}); set "
            f"{', '.join(ENV_VARS)} or run where jax detects the cluster (Cloud TPU, SLURM)"
        ) from None
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (logs, plots, summaries): process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (e.g. after process 0 has made a
    directory the others are about to use)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def max_over_processes(n: int) -> int:
    """The largest `n` any process holds (its own `n` in one process)."""
    if jax.process_count() == 1:
        return int(n)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int64(n))))


def gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order (`[text]` in one process)."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int64(len(raw)))
    padded = np.zeros(_bucket(int(np.max(lengths))), np.uint8)
    padded[: len(raw)] = raw
    rows = multihost_utils.process_allgather(padded)
    return [bytes(r[:n]).decode() for r, n in zip(rows, lengths)]


def from_primary(obj: Any) -> Any:
    """Process 0's `obj` (JSON data) on every process; in one process, `obj` itself."""
    if jax.process_count() == 1:
        return obj
    return json.loads(gather_text(json.dumps(obj) if is_primary() else "null")[0])


def check_same(
    what: str, text: str, explain: Callable[[str, str], str | None] | None = None
) -> None:
    """Fails on every process, with one line, when the processes hold different `text` (a
    resolved config, say): `explain(text_of_process_0, text_of_the_first_other)` names
    the difference."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests = gather_text(digest)
    if len(set(digests)) == 1:
        return
    odd = next(i for i, d in enumerate(digests) if d != digests[0])
    texts = gather_text(text)  # only on disagreement: name what differs
    detail = explain(texts[0], texts[odd]) if explain else None
    raise ConfigError(
        f"processes disagree on the {what}: process {odd}'s differs from process 0's"
        + (f" ({detail})" if detail else "")
        + "; start every process with the same command"
    )


def _bucket(n: int) -> int:
    """Sizes rounded up to a power of two (>= 64), so a collective of a new length seldom
    compiles a new program."""
    return max(64, 1 << max(n - 1, 0).bit_length())
