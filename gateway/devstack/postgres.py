"""The PostgreSQL server of the dev stack: Debian's `postgresql` binaries on a data folder of our own.

The binaries come from `/usr/lib/postgresql/<major>/bin` (newest first) or PATH; as root with `apt-get`
(a fresh CI machine) Debian's `postgresql` package is installed when they are missing. PostgreSQL refuses
to run as root, so root runs `initdb` and the server as the `postgres` system user through `setpriv`, which
execs in place: the pid file names the postmaster itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from gateway.devstack.processes import Managed, StackError

DEBIAN_LIB_DIR = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
# The role, its password and the database the dev stack creates; the URL carries all three.
USER = PASSWORD = DATABASE = "kpg"
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes, NUL included


def url_for(port: int) -> str:
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"


def find_postgres_bin(
    *, progress: Callable[[str], None] = lambda _: None, lib_dir: Path = DEBIAN_LIB_DIR
) -> Path:
    """The folder holding `postgres` and `initdb`; installs Debian's package when root can."""
    found = _installed_bin_dir(lib_dir)
    if found is not None:
        return found
    apt_get = shutil.which("apt-get")
    if os.geteuid() != 0 or apt_get is None:
        raise StackError(
            "no PostgreSQL server found (`postgres` and `initdb`): install it (Debian: "
            "`apt-get install postgresql`), or point the tests at a running server with KPG_TEST_POSTGRES_URL"
        )
    progress("installing PostgreSQL (Debian's `postgresql` package)")
    _apt_install(apt_get, "postgresql")
    found = _installed_bin_dir(lib_dir)
    if found is None:
        raise StackError(f"`apt-get install postgresql` succeeded, yet no `postgres` is in {lib_dir}/*/bin")
    return found


def _installed_bin_dir(lib_dir: Path) -> Path | None:
    candidates = sorted(lib_dir.glob("*/bin"), key=_version, reverse=True)
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if all(os.access(bin_dir / name, os.X_OK) for name in ("postgres", "initdb")):
            return bin_dir
    return None


def _version(bin_dir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bin_dir.parent.name.split("."))
    except ValueError:
        return (-1,)


def _apt_install(apt_get: str, package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt_get, "install", "-y", "--no-install-recommends", package]
    result = _run(install, env=env)
    if result.returncode != 0:
        # A fresh machine may have no (or stale) package lists yet.
        result = _run([apt_get, "update"], env=env)
        if result.returncode == 0:
            result = _run(install, env=env)
    if result.returncode != 0:
        raise StackError(f"installing Debian's `{package}` failed:\n{_tail(result.stdout)}")


def render_config(port: int, socket_dir: Path) -> str:
    """The settings the dev stack adds to `postgresql.conf` (included from `kpg.conf`)."""
    quoted_dir = str(socket_dir).replace("'", "''")
    return (
        "listen_addresses = '127.0.0.1'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{quoted_dir}'\n"
        "max_connections = 200\n"
        "# A throwaway dev and test database: durability is traded for speed.\n"
        "fsync = off\n"
        "synchronous_commit = off\n"
        "full_page_writes = off\n"
    )


def postgres_answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout_s))) as connection:
            connection.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def server_account() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (created if missing); None: run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        pass
    useradd = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    created = _run([*useradd, SERVER_USER])
    if created.returncode != 0:
        raise StackError(f"creating the `{SERVER_USER}` system user failed:\n{_tail(created.stdout)}")
    return pwd.getpwnam(SERVER_USER)


def first_unsearchable(path: Path, account: pwd.struct_passwd) -> Path | None:
    """The first folder on the way to `path` that `account` may not enter, if any."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for folder in reversed([path, *path.parents]):
        info = folder.stat()
        if info.st_uid == account.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return folder
    return None


@dataclass(frozen=True, slots=True)
class PostgresNode:
    state_dir: Path
    port: int

    @property
    def process(self) -> Managed:
        return Managed("postgres", self.state_dir)

    @property
    def url(self) -> str:
        return url_for(self.port)

    @property
    def home(self) -> Path:
        """Owned by the server's account: the data folder and the unix socket live here."""
        return self.state_dir / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def start(self, bin_dir: Path) -> None:
        account = server_account()
        run_as = _run_as(account)
        self._prepare_home(account)
        if not (self.home / ".initialized").exists():
            self._initialize(bin_dir, run_as, account)
        config = self.data_dir / "kpg.conf"
        config.write_text(render_config(self.port, self.home))
        _chown(config, account)
        self.process.start([*run_as, str(bin_dir / "postgres"), "-D", str(self.data_dir)])

    def answers(self, timeout_s: float = 1.0) -> bool:
        return postgres_answers(self.url, timeout_s)

    def stop(self, timeout_s: float = 20.0) -> bool:
        """A fast shutdown (SIGINT): SIGTERM alone is PostgreSQL's smart shutdown, which waits for clients."""
        pid = self.process.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        return self.process.stop(timeout_s)

    def _prepare_home(self, account: pwd.struct_passwd | None) -> None:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket_path = self.home / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_path)) > _SOCKET_PATH_MAX:
            raise StackError(
                f"{self.state_dir} is too long a path for a unix socket: use a shorter state folder"
            )
        if account is None:
            return
        os.chown(self.home, account.pw_uid, account.pw_gid)
        # Enough for the server's account to reach its folder: searchable, not listable.
        self.state_dir.chmod(self.state_dir.stat().st_mode | stat.S_IXOTH)
        blocked = first_unsearchable(self.home, account)
        if blocked is not None:
            raise StackError(
                f"the `{account.pw_name}` user that runs PostgreSQL cannot enter {blocked}: "
                "use a state folder it can reach (e.g. one made by `mktemp -d` under /tmp)"
            )

    def _initialize(self, bin_dir: Path, run_as: Sequence[str], account: pwd.struct_passwd | None) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)  # what a failed earlier attempt left
        password_file = self.home / "password"
        password_file.write_text(PASSWORD + "\n")
        _chown(password_file, account)
        try:
            initdb = _run(
                [
                    *run_as,
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    f"--username={USER}",
                    f"--pwfile={password_file}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            )
        finally:
            password_file.unlink(missing_ok=True)
        if initdb.returncode != 0:
            raise StackError(f"initdb failed:\n{_tail(initdb.stdout)}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("include_if_exists = 'kpg.conf'\n")
        # A one-off single-user backend creates the database before the server ever listens.
        single_user = ["--single", "-D", str(self.data_dir), "-F", "-c", "exit_on_error=on", "postgres"]
        created = _run(
            [*run_as, str(bin_dir / "postgres"), *single_user], input=f"CREATE DATABASE {DATABASE}\n"
        )
        if created.returncode != 0:
            raise StackError(f"creating the `{DATABASE}` database failed:\n{_tail(created.stdout)}")
        (self.home / ".initialized").write_text("")


def _run_as(account: pwd.struct_passwd | None) -> list[str]:
    if account is None:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise StackError("running PostgreSQL as root needs `setpriv` (Debian: `apt-get install util-linux`)")
    # setpriv execs in place (runuser would fork and wait), so the pid we record is the postmaster's.
    return [
        setpriv,
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--init-groups",
        "--reset-env",
        "--",
    ]


def _chown(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def _run(
    argv: Sequence[str], *, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        input=input or "",  # never the caller's stdin
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        check=False,
    )


def _tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.splitlines()[-lines:])
