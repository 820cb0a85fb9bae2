"""The dev stack's PostgreSQL without a server: finding or installing binaries, its settings, its URL."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from gateway.devstack import DevStack, StackError
from gateway.devstack import postgres as postgres_module
from gateway.devstack.postgres import PostgresNode, find_postgres_bin, first_unsearchable, render_config


def _fake_bin(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_the_newest_installed_major_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for version in ("9.6", "13", "15"):
        _fake_bin(tmp_path / "lib" / version / "bin")
    (tmp_path / "lib" / "16" / "bin").mkdir(parents=True)  # only the client tools of 16
    assert find_postgres_bin(lib_dir=tmp_path / "lib") == tmp_path / "lib" / "15" / "bin"


def test_postgres_on_path_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bin_dir = _fake_bin(tmp_path / "pg" / "bin")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_postgres_bin(lib_dir=tmp_path / "none") == bin_dir


def test_missing_postgres_without_root_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(StackError, match=r"apt-get install postgresql.*KPG_TEST_POSTGRES_URL"):
        find_postgres_bin(lib_dir=tmp_path / "none")


def test_root_installs_the_debian_package_updating_lists_once_needed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lib_dir = tmp_path / "lib"
    calls = tmp_path / "calls"
    tools = tmp_path / "tools"
    tools.mkdir()
    # A fresh machine: `install` fails until `update` has fetched the package lists.
    (tools / "apt-get").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'if [ "$1" = update ]; then echo > {tmp_path}/lists; exit 0; fi\n'
        f"[ -e {tmp_path}/lists ] || {{ echo 'E: Unable to locate package postgresql'; exit 100; }}\n"
        f"cd {tmp_path} && /bin/mkdir -p lib/15/bin && cd lib/15/bin\n"
        "for tool in postgres initdb; do echo > $tool; /bin/chmod +x $tool; done\n"
    )
    (tools / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))  # only the fake apt-get: this machine's PostgreSQL stays unseen
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert find_postgres_bin(lib_dir=lib_dir) == lib_dir / "15" / "bin"
    assert calls.read_text().splitlines() == [
        "install -y --no-install-recommends postgresql",
        "update",
        "install -y --no-install-recommends postgresql",
    ]


def test_failed_install_shows_apt_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "apt-get").write_text("#!/bin/sh\necho 'E: no network'\nexit 100\n")
    (tools / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setattr(postgres_module, "_installed_bin_dir", lambda _: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(StackError, match=r"(?s)installing Debian's `postgresql` failed.*E: no network"):
        find_postgres_bin(lib_dir=tmp_path)


def test_config_listens_on_loopback_and_trades_durability_for_speed(tmp_path: Path) -> None:
    config = render_config(54321, tmp_path / "it's")
    settings = dict(line.split(" = ", 1) for line in config.splitlines() if not line.startswith("#"))
    assert settings == {
        "listen_addresses": "'127.0.0.1'",
        "port": "54321",
        "unix_socket_directories": f"'{tmp_path}/it''s'",
        "max_connections": "200",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }


def test_url_names_role_password_and_database(tmp_path: Path) -> None:
    assert PostgresNode(tmp_path, 54321).url == "postgresql://kpg:kpg@127.0.0.1:54321/kpg"


def test_a_folder_the_server_account_cannot_enter_is_found(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid())
    inner = tmp_path / "state" / "postgres"
    inner.mkdir(parents=True)
    assert first_unsearchable(inner, me) is None
    (tmp_path / "state").chmod(0o600)
    try:
        assert first_unsearchable(inner, me) == tmp_path / "state"
    finally:
        (tmp_path / "state").chmod(0o700)


def test_env_names_the_database_when_the_stack_runs_postgres(tmp_path: Path) -> None:
    ports = {"kafka_port": 19092, "controller_port": 19093, "redis_port": 16379, "postgres_port": 15432}
    (tmp_path / "stack.json").write_text(json.dumps(ports))
    assert DevStack(tmp_path).env_lines()[-1] == (
        "export KPG_DATABASE__URL=postgresql://kpg:kpg@127.0.0.1:15432/kpg"
    )
