"""Start, find and stop the stack's processes by pid file, never touching anything we did not start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class StackError(RuntimeError):
    """A dev stack problem a person can act on; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Managed:
    """One process of the stack: its pid file remembers the pid and the command that started it."""

    name: str
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def start(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the CLI; Ctrl-C in the terminal does not reach it
                env=env,
                cwd=self.state_dir,
            )
        self.pid_file.write_text(f"{process.pid}\n{_start_time(process.pid)}\n")
        return process.pid

    def pid(self) -> int | None:
        """The pid if our process is alive; a stale pid file (or a reused pid) gives None."""
        try:
            pid_text, started = self.pid_file.read_text().splitlines()[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        # The start time tells our process from a later one that reused its pid.
        return pid if _alive(pid) and _start_time(pid) == started else None

    def stop(self, timeout_s: float = 20.0) -> bool:
        """SIGTERM, then SIGKILL after the timeout. Returns whether a process was stopped."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        return True


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return "unknown"


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is not our child is as good as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all held open while choosing, so none is handed out twice)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ensure_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} for {what} is already in use on 127.0.0.1: stop whatever holds it "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or choose another port"
            ) from None


def wait_until(check: Callable[[], bool], *, what: str, timeout_s: float, process: Managed) -> None:
    """Poll `check()` until it is true; fail early if the process died, pointing at its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if process.pid() is None:
            raise StackError(
                f"{what} exited during start-up; see {process.log_file}:\n{_tail(process.log_file)}"
            )
        time.sleep(0.25)
    raise StackError(f"{what} did not answer within {timeout_s:.0f}s; see {process.log_file}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
