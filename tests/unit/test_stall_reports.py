"""What the gateway says when something stops making progress: a blocked event loop, an await that never
returns. (A consumer step that does not end: tests/integration/test_kafka_adapters.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from gateway.tasks import awaiting_stack

BLOCKS_THE_LOOP = textwrap.dedent(
    """
    import asyncio, logging, time
    from gateway.observability import report_loop_stalls

    def sleeps_on_the_loop():
        time.sleep(2.5)

    async def main():
        logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
        reporter = asyncio.create_task(report_loop_stalls(stall_s=1.0))
        await asyncio.sleep(0.3)
        asyncio.get_running_loop().call_soon(sleeps_on_the_loop)
        await asyncio.sleep(0.5)
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
        await asyncio.sleep(1.5)  # cancelled: nothing is dumped any more

    asyncio.run(main())
    """
)


def test_a_blocked_loop_dumps_every_thread_then_says_for_how_long() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCKS_THE_LOOP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    dump, _, after = done.stderr.partition("LOG WARNING the event loop was blocked for ")
    # faulthandler's dump, written while the loop was still blocked: the blocking call is in it.
    assert "Timeout (0:00:01)!" in dump and "in sleeps_on_the_loop" in dump
    assert float(after.split("s")[0]) >= 2.0 and "every thread's stack was written to stderr then" in after
    assert "Timeout" not in after, "a dump after the reporter was cancelled"


async def test_awaiting_stack_names_every_coroutine_of_the_await_chain() -> None:
    release = asyncio.Event()

    async def innermost() -> None:
        await release.wait()

    async def middle() -> None:
        await innermost()

    async def outermost() -> None:
        await middle()

    task = asyncio.create_task(outermost())
    await asyncio.sleep(0)
    stack = awaiting_stack(task)
    names = [line.split(" in ")[-1] for line in stack.splitlines() if line.startswith("  File ")]
    assert names[:3] == ["outermost", "middle", "innermost"]
    assert "await release.wait()" in stack
    release.set()
    await task
