"""Generates the Python client's blocking `kpg.Client` (clients/python/src/kpg/sync.py) from its asyncio
`kpg.AsyncClient` (aio.py), so the two never drift: unasync rewrites the tokens (`async def` -> `def`,
`await x` -> `x`, `async for` -> `for`, `AsyncGenerator` -> `Generator`, the names below), then a few
replacements cover what tokens cannot (grpc's `aio` module, docstrings). Run by scripts/gen.sh (make gen);
check-gen fails when sync.py is not what this gives. Every replacement must apply, so an edit to aio.py
that one of them no longer matches fails here instead of slipping through."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import unasync  # type: ignore[import-untyped]

KPG = Path(__file__).resolve().parent.parent / "clients" / "python" / "src" / "kpg"
HEADER = "# Generated from aio.py by scripts/unasync_client.py (make gen). Do not edit: edit aio.py.\n"
DOCSTRING = (
    '"""`Client`: the typed blocking client, the same calls as `kpg.AsyncClient` on grpc\'s sync API. Every\n'
    "method takes and returns plain Python values (`kpg.models`), raises `kpg.KpgError` subclasses, retries\n"
    'what is safe to retry and keeps to a deadline."""'
)

NAMES = {"AsyncClient": "Client", "AsyncServerStream": "ServerStream", "asyncio": "time"}
# (pattern, replacement), in order; each must match at least once.
EDITS = [
    (r'\A"""[^"]*"""', DOCSTRING),  # the module's docstring
    (r"# ruff: noqa: ASYNC109 .*\n\n", ""),  # about asyncio.timeout
    (r"Generator\[R, None\]", "Generator[R, None, None]"),
    (
        r"typed asyncio client; one channel, used as `async with AsyncClient\(target\) as kpg:`\.",
        "typed blocking client; one channel, used as `with Client(target) as kpg:`. Safe to share\n"
        "    between threads.",
    ),
    (r"`async for event in kpg\.subscribe", "`for event in kpg.subscribe"),
    (r"grpc\.aio\.", "grpc."),
]


def _literally(text: str) -> Callable[[re.Match[str]], str]:
    """A replacement for re.sub taken as it is (no group references, no escapes)."""
    return lambda _: text


def main() -> int:
    rule = unasync.Rule(fromdir="/aio.py", todir="/sync.py", additional_replacements=NAMES)
    unasync.unasync_files([str(KPG / "aio.py")], [rule])
    target = KPG / "sync.py"
    text = target.read_text()
    for pattern, replacement in EDITS:
        text, count = re.subn(pattern, _literally(replacement), text)
        if not count:
            print(f"unasync_client.py: nothing matches {pattern!r} any more: update EDITS", file=sys.stderr)
            return 1
    target.write_text(HEADER + text)
    ruff = Path(sys.executable).parent / "ruff"
    subprocess.run([str(ruff), "check", "--quiet", "--fix", "--select", "I", str(target)], check=True)
    subprocess.run([str(ruff), "format", "--quiet", str(target)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
