"""glibc allocator settings for the training and evaluation processes (and the benchmarks).

XLA on CPU takes each execution's temporary buffers (hundreds of MB for a train step) from
glibc's ``malloc``. With glibc's defaults, many per-thread arenas hand those pages back to the
kernel and fault them in again on the next step. In the default run's MM-DiT stage (2 cores)
that is 4.5 million page faults and 10 s of kernel CPU in every 20 s, against 0.2 million and
1.4 s with one arena that never trims: the whole run takes 33.3 instead of 35.6 minutes
(BENCHMARKS.md §1.44). glibc reads these variables only at start-up, so a CLI re-executes itself
once with them set.
"""

from __future__ import annotations

import os
import sys

HOST_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**32),
    "MALLOC_TRIM_THRESHOLD_": str(2**32),
}
OPT_OUT = "MUDDIT_DEFAULT_MALLOC"


def reexec_with_host_env(module: str, argv: list[str]) -> None:
    """Replace this process by ``python -m module *argv`` with :data:`HOST_ENV` added, unless
    every variable is already set (a value the user set is kept) or ``MUDDIT_DEFAULT_MALLOC=1``.
    Returns only when no re-execution is needed."""
    if os.environ.get(OPT_OUT) == "1" or all(k in os.environ for k in HOST_ENV):
        return
    env = {**HOST_ENV, **os.environ}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
