"""Preemption: SIGUSR1 / SIGTERM / SIGINT ask the run to checkpoint at the next step boundary and exit with
EXIT_PREEMPTED.

Slurm sends the warning signal (`#SBATCH --signal=B:USR1@120`) or SIGTERM (scancel, preemption, time limit; SIGKILL
follows after KillWait). A handler only sets a flag: checkpointing inside a signal handler could interrupt a
half-done optimizer step. The pretraining loop polls `requested()` between steps, saves its checkpoint and raises
`Preempted`; the CLI turns that into exit status EXIT_PREEMPTED, which slurm/*.sbatch read as "requeue me".
Ctrl-C (SIGINT) is the same request from a terminal; a second Ctrl-C stops at once (KeyboardInterrupt, which the
CLI reports in one line with EXIT_INTERRUPTED), leaving the last checkpoint as it was.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Distinct from 0 (done), 1 (error),
# 2 (bad input) and from 128 + N (killed by signal N), so a job script can tell "requeue me" from a failure.
EXIT_PREEMPTED = 75
# 128 + SIGINT, the shell's status for a process stopped by Ctrl-C: a second Ctrl-C, no new checkpoint written.
EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_received: int | None = None


class Preempted(Exception):
    """Raised by the training loop after it wrote its checkpoint because a preemption signal arrived."""

    def __init__(self, signum: int, step: int, checkpointed: bool = True):
        self.signum, self.step, self.checkpointed = signum, step, checkpointed
        name = signal.Signals(signum).name
        saved = "checkpoint written" if checkpointed else "no checkpoint in this phase (it restarts on --resume)"
        super().__init__(f"preempted by {name} at step {step}: {saved}")


def requested() -> int | None:
    """The signal number that asked for preemption, or None."""
    return _received


def requested_by_any(group) -> int | None:
    """The signal if any trainer of `group` (a dist.TrainerGroup) received one: the largest signal number over the
    trainers, so all of them stop at the same step boundary (checkpoints are collective)."""
    from realm_hpc.dist import max_over_trainers

    return max_over_trainers(requested() or 0, group) or None


def _handler(signum, frame) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C twice: the user will not wait for the step boundary
    if _received is None:
        again = " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else ""
        print(f"received {signal.Signals(signum).name}: checkpointing at the next step boundary{again}",
              file=sys.stderr, flush=True)
    _received = signum


@contextmanager
def handlers(signals=SIGNALS):
    """Install the flag-setting handlers (main thread only) for the duration of the block; restore the old ones.

    A signal the parent set to be ignored stays ignored (the nohup convention): `trap "" USR1` before the launch
    opts out of USR1 preemption, e.g. under mpiexec -disable-auto-cleanup, whose hydra sends SIGUSR1 to the
    surviving ranks when one dies (tests/test_refresher_death.py)."""
    global _received
    _received = None
    old = {s: signal.signal(s, _handler) for s in signals if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
