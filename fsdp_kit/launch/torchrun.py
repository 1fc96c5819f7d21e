"""``python -m fsdp_kit.launch.torchrun [torchrun arguments]``: torchrun that keeps the requeue exit code and says,
in one line per failure, which node and rank failed, how, and what happens next.

Plain torchrun exits 1 whenever its trainers stopped for a preemption: a SIGTERM to torchrun is forwarded to
the trainers (which save and exit with EXIT_REQUEUE) and then raised again as ``SignalException``; trainers
that exit with EXIT_REQUEUE on their own (SIGUSR2) become a ``ChildFailedError``. Here both end in
EXIT_REQUEUE, so a scheduler or script that acts on the exit code requeues the job. (With plain torchrun the
run dir's ``preempted`` marker, written by rank 0 after the save, says the same.)

With ``--max-restarts=N`` a rank that dies (a signal, an exception, a collective that failed because a peer went
away) or hangs (the watchdog exits EXIT_REQUEUE) makes every node restart its workers through the c10d rendezvous;
they resume from the run dir's newest complete checkpoint. A preemption save is never restarted in place: the job is
requeued. The agent's own messages (and the workers' tracebacks, with ``--redirects=2``) go to files under
``--log-dir``; the job log gets one ``fsdp_kit:`` line per failure, naming the file.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

# Before torch loads: c10d's C++ warnings (a store connection closed when another node's agent stopped) come with
# 30 lines of native stack frames each; the Agent's one line per failure says what happened.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.launcher import api as launcher_api
from torch.distributed.run import main as torchrun_main

from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTED_MARKER, PREEMPTION_SIGNALS
from fsdp_kit.launch.slurm import TORCHRUN_LOGS
from fsdp_kit.training.watchdog import HANG_DIR

_ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b.*|^error: .*")


def asks_for_requeue(exit_codes: list[int]) -> bool:
    """Some trainer exited with EXIT_REQUEUE (a preemption save, or the hang watchdog): the job is worth
    requeueing, whatever the others did (the peers of a hung rank fail their collective and exit 1, or are
    stopped by torchrun's teardown signal)."""
    return EXIT_REQUEUE in exit_codes


def _say(line: str) -> None:
    print(f"fsdp_kit: node {socket.gethostname()}: {line}", file=sys.stderr, flush=True)


def _last_error(path: str | None) -> str:
    """The last exception line a worker wrote to its redirected stderr, shortened; empty where none."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as handle:
        handle.seek(max(0, os.path.getsize(path) - 65536))
        lines = [line.strip() for line in handle.read().splitlines()]
    found = [line for line in lines if _ERROR_LINE.match(line)]
    if not found:
        return ""
    text = found[-1]
    return text if len(text) <= 200 else text[:197] + "..."


def describe(failure: ProcessFailure, rank: int, run_dir: Path | None, since: float, stderr: str | None) -> str:
    """How one worker failed, in a few words: signal, watchdog, preemption save, or its last exception."""
    code = failure.exitcode
    if code < 0:
        return f"was killed by {failure.signal_name()}"
    if code == EXIT_REQUEUE:
        hang = run_dir / HANG_DIR / f"rank{rank}.txt" if run_dir else None
        if hang is not None and hang.is_file() and hang.stat().st_mtime >= since:
            return f"hung: the hang watchdog stopped it (exit {code}; stacks in {hang})"
        return f"saved for preemption (exit {code})"
    error = _last_error(stderr)
    if re.search(r"timed? ?out|timeout", error, re.IGNORECASE):
        # The same words on every rank that waited (the exception differs: a send or a recv), so a node's ranks
        # make one line; the exception is in the file the line names.
        return f"exited {code}: collective timeout (a node or the network stopped answering for dist.timeout_s)"
    return f"exited {code}" + (f" ({error})" if error else "")


def torn_down(exit_codes: list[int]) -> list[bool]:
    """Which failures are torchrun's own teardown: once one worker of a node failed, torchrun stops the others with
    SIGTERM and lists them as failed too. They are no cause of their own (unless SIGTERM is all there is)."""
    teardown = -signal.SIGTERM
    if all(code == teardown for code in exit_codes):
        return [False] * len(exit_codes)
    return [code == teardown for code in exit_codes]


def is_preemption(codes: list[int], causes: list[str], marker_left: bool = False) -> bool:
    """The trainers saved for a preemption: requeue the job, never restart in place. Either every failed trainer
    exited EXIT_REQUEUE after a save, or rank 0 left the run dir's ``preempted`` marker during this attempt (it
    writes it after the save: a trainer that then crashes on its way out, e.g. SIGABRT in a process group's
    teardown, does not undo the save)."""
    return marker_left or (
        all(code == EXIT_REQUEUE for code in codes) and not any(c.startswith("hung") for c in causes)
    )


class Agent(LocalElasticAgent):
    """torchrun's agent, with a line per failure and no restart in place after a preemption save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attempt_started = time.time()
        self._reported = False
        self.preempted = False
        Agent.last = self

    last: Agent | None = None  # the agent torchrun built (main reads its verdict after torchrun returns)

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, object]:
        self._attempt_started = time.time()
        self._reported = False
        return super()._start_workers(worker_group)

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        if not self._reported:  # our workers are fine: a worker on another node failed (its node says which)
            _say("another node's workers failed; restarting ours to rejoin them from the newest checkpoint")
            # Count this restart as the failed node counts its own: the workers' store prefix is the restart count
            # (TORCHELASTIC_RESTART_COUNT), and nodes that disagree on it read each other's stale addresses from an
            # earlier attempt (gloo then fails connecting: "Connection refused").
            self._remaining_restarts = max(0, self._remaining_restarts - 1)
        super()._restart_workers(worker_group)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state in {WorkerState.FAILED, WorkerState.UNHEALTHY} and result.failures:
            self._report(worker_group, result)
        return result

    def _report(self, worker_group: WorkerGroup, result: RunResult) -> None:
        logs = Path(self._logs_specs.root_log_dir)
        run_dir = logs.parent if logs.name == TORCHRUN_LOGS else None  # the sbatch template's --log-dir
        stderrs = getattr(self._pcontext, "stderrs", {}) or {}
        failures = sorted(result.failures.items(), key=lambda item: item[1].timestamp)
        stopped = torn_down([failure.exitcode for _, failure in failures])
        failures = [item for item, by_torchrun in zip(failures, stopped) if not by_torchrun]
        causes = [describe(f, rank, run_dir, self._attempt_started, stderrs.get(f.local_rank)) for rank, f in failures]
        spec = worker_group.spec
        marker = run_dir / PREEMPTED_MARKER if run_dir else None
        marker_left = marker is not None and marker.is_file() and marker.stat().st_mtime >= self._attempt_started
        if is_preemption([f.exitcode for _, f in failures], causes, marker_left):
            self._remaining_restarts = 0  # the trainers saved: the job is requeued, not restarted in place
            self.preempted = True
            after = "the job is requeued and resumes from that save"
        elif self._remaining_restarts > 0:
            done = spec.max_restarts - self._remaining_restarts
            after = (
                f"restarting the workers of every node from the newest checkpoint (restart {done + 1} of "
                f"{spec.max_restarts})"
            )
        elif any(f.exitcode == EXIT_REQUEUE for _, f in failures):
            after = f"no restarts left (slurm.max_restarts={spec.max_restarts}); the job is requeued"
        else:
            after = f"no restarts left (slurm.max_restarts={spec.max_restarts}); stopping"
        alike: dict[str, list[tuple[int, ProcessFailure]]] = {}  # one line per cause: a lost network fails them all
        for (rank, failure), cause in zip(failures, causes):
            alike.setdefault(cause, []).append((rank, failure))
        for cause, ranks in alike.items():
            outputs = [
                str(stderrs[f.local_rank]) for _, f in ranks if stderrs.get(f.local_rank) and f.exitcode != EXIT_REQUEUE
            ]
            where = f"; {'its' if len(ranks) == 1 else 'their'} output: {', '.join(outputs)}" if outputs else ""
            who = (
                f"rank{'s' if len(ranks) > 1 else ''} {', '.join(str(rank) for rank, _ in ranks)} "
                f"(local {', '.join(str(f.local_rank) for _, f in ranks)})"
            )
            _say(f"{who} {cause}; {after}{where}")
        self._reported = True


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; the exit code, EXIT_REQUEUE after a preemption or a hang."""
    os.environ["FSDP_KIT_TORCHRUN"] = "1"  # the trainers' log line then names the right exit code
    # A restart needs a fresh store for the workers' process group. With the rendezvous' TCP store shared (torch's
    # default), the workers of a restart read the previous attempt's keys (no per-attempt prefix) and gloo fails
    # connecting to ranks that are gone ("Connection refused"): rank 0's worker hosts a new store each attempt.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    launcher_api.LocalElasticAgent = Agent  # type: ignore[misc]  # what torchrun's launch_agent builds
    # The agent's own per-process warnings ("Sending process N closing signal", "failed (exitcode: ...)") say
    # again, in several lines per node, what the Agent's one line per failure says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except SignalException as err:
        if err.sigval not in PREEMPTION_SIGNALS:
            raise
        # torchrun has forwarded the signal and waited (up to its shutdown timeout, TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
        # for the trainers to save. Requeue either way: a preempted job resumes from its newest checkpoint.
        print(
            f"fsdp_kit: torchrun got {err.sigval.name} and passed it to the trainers; exiting with "
            f"{EXIT_REQUEUE} so the job is requeued",
            file=sys.stderr,
        )
        return EXIT_REQUEUE
    except ChildFailedError as err:
        # Each failure has had its line (Agent._report); the traceback is in the file it named.
        preempted = Agent.last is not None and Agent.last.preempted
        if preempted or asks_for_requeue([failure.exitcode for failure in err.failures.values()]):
            return EXIT_REQUEUE
        return 1
    except RendezvousError as err:
        # The rendezvous is hosted by the first node's agent: once that one stopped (it said why in its own line),
        # the others cannot rejoin. One line, not the agent's traceback.
        _say(
            f"cannot rejoin the other nodes ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "stopping (the node that stopped first says why)"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
