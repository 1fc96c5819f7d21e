"""``python -m fsdp_kit.launch.torchrun [torchrun arguments]``: torchrun that keeps the requeue exit code.

Plain torchrun exits 1 whenever its trainers stopped for a preemption: a SIGTERM to torchrun is forwarded to
the trainers (which save and exit with EXIT_REQUEUE) and then raised again as ``SignalException``; trainers
that exit with EXIT_REQUEUE on their own (SIGUSR2) become a ``ChildFailedError``. Here both end in
EXIT_REQUEUE, so a scheduler or script that acts on the exit code requeues the job. (With plain torchrun the
run dir's ``preempted`` marker, written by rank 0 after the save, says the same.)
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTION_SIGNALS


def asks_for_requeue(exit_codes: list[int]) -> bool:
    """Some trainer exited with EXIT_REQUEUE and every other one did too or was stopped by torchrun's own
    teardown signal (negative: killed by SIGTERM/SIGKILL after the first one left, as when the hang watchdog
    fires on one rank first)."""
    teardown = {-signal.SIGTERM, -signal.SIGKILL}
    return EXIT_REQUEUE in exit_codes and all(code == EXIT_REQUEUE or code in teardown for code in exit_codes)


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; the exit code, EXIT_REQUEUE after a preemption."""
    os.environ["FSDP_KIT_TORCHRUN"] = "1"  # the trainers' log line then names the right exit code
    try:
        torchrun_main(argv)
    except SignalException as err:
        if err.sigval not in PREEMPTION_SIGNALS:
            raise
        # torchrun has forwarded the signal and waited (up to its shutdown timeout, TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
        # for the trainers to save. Requeue either way: a preempted job resumes from its newest checkpoint.
        print(f"fsdp_kit: torchrun got {err.sigval.name} and passed it to the trainers; exiting with "
              f"{EXIT_REQUEUE} so the job is requeued", file=sys.stderr)
        return EXIT_REQUEUE
    except ChildFailedError as err:
        if not asks_for_requeue([failure.exitcode for failure in err.failures.values()]):
            raise
        print(f"fsdp_kit: the trainers stopped to be requeued (a preemption save or the hang watchdog); exiting "
              f"with {EXIT_REQUEUE}", file=sys.stderr)
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
