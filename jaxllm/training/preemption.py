"""Saving on a preemption notice: a training loop that is told to stop (SIGTERM, what a spot
VM, a TPU maintenance event, SLURM or Kubernetes send before they kill a job) saves a
checkpoint at the next step and exits, so a rerun of the same command loses nothing.

One process: a SIGTERM handler (installed by `PreemptionWatch` for the loop's duration, on the
main thread) sets a flag the loop reads once per step; no device sync. Many processes (or any
run that joined `jax.distributed`): jax's preemption service catches SIGTERM in whichever
process gets it and agrees with the others on one step to stop at
(`multihost_utils.reached_preemption_sync_point`, called by every process at every step), so
every process saves the same step, as the collective checkpoint needs.

A run preempted this way raises `Preempted`; `python -m jaxllm.main` prints where the
checkpoint is and exits with 143 (128 + SIGTERM), so a scheduler sees a terminated job.
(jax is imported only when used: `python -m jaxllm.main` imports this module before it
reads the config.)
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Preempted(Exception):
    """The run stopped on a preemption notice after saving a checkpoint (or, where it could
    not save one exactly, keeping the last one); rerunning the same command resumes it."""

    exit_code = 128 + signal.SIGTERM


def _mode() -> str:
    """ "service": joined by jax.distributed with its preemption service (the default), which
    owns SIGTERM; "local": one process, a Python handler; "off": several processes without
    the service (JAX_ENABLE_PREEMPTION_SERVICE=false), where a process that saved alone would
    hang the others' collective save, so SIGTERM keeps its default meaning."""
    import jax
    from jax._src import distributed  # the public API has no "is the client up" query

    g = distributed.global_state
    if g.client is not None and g.preemption_sync_manager is not None:
        return "service"
    return "local" if jax.process_count() == 1 else "off"


_deferred: list[str] = []  # ["SIGTERM"]: a loop got the notice at its last step and finished


def defer() -> None:
    """A loop got the notice at its last step (or an early stop) and finished its stage: the
    next loop of this process (a pipeline's next stage, distillation's baseline) must not
    start. The flag is this process's alone; with the service every process sets it alike
    (they agreed on the step)."""
    _deferred[:] = ["SIGTERM"]


def clear_deferred() -> None:
    """At the start of a run that checks (a long-lived process, e.g. a notebook kernel, may
    hold a notice from an earlier, finished run)."""
    _deferred.clear()


def check_deferred(what: str) -> None:
    """Raises `Preempted` (once) if a finished loop deferred a notice, before `what` starts."""
    if _deferred:
        _deferred.clear()
        raise Preempted(stop_message("the stage before it finished", f"{what} not started"))


class PreemptionWatch:
    """`watch.install()` before a loop, `if watch.reached(step): save and raise` in it,
    `watch.remove()` after it (in a `finally`).

    `reached(step)` must be called at every step by every process (steps counting up from
    the same start on all of them); it is True at the step the run should save and stop."""

    def __init__(self, enabled: bool = True) -> None:
        self.mode = _mode() if enabled else "off"
        self.notice: str | None = None  # the signal's name, once one arrived (one process)
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        # With the service, jax's own notifier owns SIGTERM (a Python handler would take it
        # away from the processes' agreement); off the main thread Python cannot install a
        # handler: the signal then keeps its old meaning.
        if self.mode == "local" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def remove(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        self.notice = signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        if self.mode == "service":
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.noticed()

    def noticed(self) -> bool:
        """One process: whether a notice has arrived by now (a loop asks again after a save,
        to stop at it rather than save once more). With the service: False (the processes
        agree only at `reached`)."""
        return self._installed and self.notice is not None


def stop_message(after: str, saved: str) -> str:
    """The line `Preempted` carries: where it stopped ("step 7"), what was saved, how to go
    on."""
    import jax

    return (
        f"preempted (SIGTERM) after {after}: {saved}; run the same command again to "
        f"resume{'' if jax.process_count() == 1 else ' (on every process)'}"
    )
