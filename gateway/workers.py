"""`kpg serve --workers N`: N gateway processes sharing the gRPC and REST ports, so every core serves.

The supervisor (this module: it imports no driver and serves nothing itself) starts N workers. Each is a
complete `kpg serve` that binds the same ports with SO_REUSEPORT, and the kernel spreads connections over
them. Invariants:
- **Same answers as one process.** A worker is a gateway instance like one on another host: everything
  shared lives in Kafka, Redis or the SQL database (writer leases and fencing, consumer groups, correlation
  and idempotency keys, saga ownership), never in one process's memory.
- **One writer per partition.** Each worker owns a share of the partitions and the others forward appends
  to it over a unix socket in a folder the supervisor makes and removes (`--peers-dir`, mode 0700):
  workers appending to the same partitions would otherwise take its writer from each other.
- **One view of the metrics.** Workers write their metrics to a folder the supervisor makes and removes
  (`PROMETHEUS_MULTIPROC_DIR`); `/metrics` of any worker adds up all of them.
- **One deployment per port.** SO_REUSEPORT would also let a second `kpg serve --workers` of the same user
  bind the ports, and the kernel would silently split connections between two deployments. The supervisor
  holds a lock per port (`hold_ports`) for its life, so the second one fails as a taken port does.
- **A dead worker is replaced** after a pause (1 s, doubling up to 30 s while it keeps dying at once);
  one that exits because its configuration is bad (2) or its ports cannot be bound (3) stops everything,
  with exit code 2 or 1, as one process would have exited.
- **Bounded stop.** SIGTERM or SIGINT is passed to every worker, which stops gracefully within its grace
  period; what is left after that and the slack is killed. A supervisor killed outright takes its workers
  with it (each asks the kernel for SIGKILL when its parent dies), as one process would have died.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

log = logging.getLogger("gateway.workers")

EXIT_BAD_CONFIG = 2
EXIT_CANNOT_SERVE = 3  # a worker could not bind its ports: the supervisor stops and exits 1
RESTART_PAUSE_S = (1.0, 30.0)  # first and longest pause before a dead worker is started again
HEALTHY_AFTER_S = 60.0  # a worker that ran this long starts its pauses over
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the supervisor) dies. Linux only; a no-op
    elsewhere. If the parent is already gone, exit at once."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def free_port(host: str) -> int:
    """A port nobody listens on now, for `--workers` with port 0 (each worker must bind the same one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def hold_ports(ports: Sequence[tuple[str, str, int]]) -> list[int]:
    """Lock each (name, host, port) for this process's life: the locks go with the process, however it
    ends. Raises OSError naming the first port another live supervisor holds (with its pid). A lock is per
    port, whatever the host: workers on 0.0.0.0 and on 127.0.0.1 would share a port just as well."""
    folder = Path(tempfile.gettempdir()) / f"kpg-ports-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    held: list[int] = []
    for name, host, port in ports:
        fd = os.open(folder / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            for other in held:
                os.close(other)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise OSError(
                f"cannot bind {name} to {host}:{port}: served by another kpg serve (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        held.append(fd)
    return held


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    pause_s: float = RESTART_PAUSE_S[0]
    restart_at: float | None = None


class Supervisor:
    def __init__(
        self,
        worker_args: Sequence[str],
        workers: int,
        *,
        stop_within_s: float,
        env: dict[str, str] | None = None,
    ) -> None:
        """`worker_args`: the `kpg` arguments every worker runs (`serve ...` with fixed ports); each gets
        `--worker-index I --worker-count N --peers-dir D` appended."""
        self._args = list(worker_args)
        self._workers = [_Worker(i) for i in range(workers)]
        self._stop_within_s = stop_within_s
        self._env = dict(os.environ if env is None else env)
        self._stopping = False
        self._exit_code = 0
        self._peers_dir = ""

    def run(self) -> int:
        """Run the workers until SIGTERM or SIGINT (or a bad configuration); returns the exit code."""
        metrics_dir = tempfile.mkdtemp(prefix="kpg-metrics-")
        self._env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        self._peers_dir = tempfile.mkdtemp(prefix="kpg-workers-")  # mode 0700: this user's processes only
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("starting %d workers", len(self._workers))
            for worker in self._workers:
                self._start(worker)
            while not self._stopping:
                self._watch()
                time.sleep(0.1)
            self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(metrics_dir, ignore_errors=True)
            shutil.rmtree(self._peers_dir, ignore_errors=True)
        return self._exit_code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("supervisor: %s, stopping the workers", signal.Signals(signum).name)
        self._stopping = True

    def _start(self, worker: _Worker) -> None:
        command = [
            *(sys.executable, "-m", "gateway", *self._args),
            *("--worker-index", str(worker.index), "--worker-count", str(len(self._workers))),
            *("--peers-dir", self._peers_dir),
        ]
        worker.process = subprocess.Popen(command, env=self._env)
        worker.started_at = time.monotonic()
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _watch(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            process = worker.process
            if process is not None and (code := process.poll()) is not None:
                worker.process = None
                _forget_metrics(process.pid, self._env["PROMETHEUS_MULTIPROC_DIR"])
                if code in (EXIT_BAD_CONFIG, EXIT_CANNOT_SERVE):
                    log.error("worker %d cannot run (exit code %d); stopping", worker.index, code)
                    self._exit_code = EXIT_BAD_CONFIG if code == EXIT_BAD_CONFIG else 1
                    self._stopping = True
                    return
                if now - worker.started_at >= HEALTHY_AFTER_S:
                    worker.pause_s = RESTART_PAUSE_S[0]
                log.error(
                    "worker %d (pid %d) exited with %d; starting it again in %.0fs",
                    worker.index,
                    process.pid,
                    code,
                    worker.pause_s,
                )
                worker.restart_at = now + worker.pause_s
                worker.pause_s = min(worker.pause_s * 2, RESTART_PAUSE_S[1])
            if worker.process is None and worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)

    def _stop_all(self) -> None:
        running = [w.process for w in self._workers if w.process is not None and w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_within_s
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
        log.info("all workers stopped")


def _forget_metrics(pid: int, path: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics folder (its counters stay counted)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    except (ImportError, OSError, KeyError):
        pass
