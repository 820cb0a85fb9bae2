"""What the gateway says when something stops making progress: a blocked event loop, an await that never
returns. (A consumer step that does not end: tests/integration/test_kafka_adapters.py.)"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time

from gateway.observability import EXIT_LOOP_STALLED
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


DEADLOCKS_THE_LOOP = textwrap.dedent(
    """
    import asyncio, threading
    from gateway.observability import report_loop_stalls

    def takes_a_lock_it_holds():
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()  # for good: nothing will release it

    async def main():
        asyncio.create_task(report_loop_stalls(stall_s=0.4, exit_s=1.5))
        await asyncio.sleep(0.2)
        takes_a_lock_it_holds()

    asyncio.run(main())
    """
)


def test_a_deadlocked_loop_ends_its_process_after_exit_s() -> None:
    done = subprocess.run(
        [sys.executable, "-c", DEADLOCKS_THE_LOOP], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EXIT_LOOP_STALLED, done.stderr
    dump, _, last = done.stderr.partition("the event loop has been blocked for ")
    assert "in takes_a_lock_it_holds" in dump  # faulthandler's first dump, at stall_s
    assert float(last.split("s")[0]) >= 1 and "in takes_a_lock_it_holds" in last  # then at exit_s, again


RUNS_FOR_4_SECONDS = textwrap.dedent(
    """
    import asyncio
    from gateway.observability import report_loop_stalls

    async def main():
        asyncio.create_task(report_loop_stalls(stall_s=0.4, exit_s=1.5))
        await asyncio.sleep(4)
        print("ran to the end")

    asyncio.run(main())
    """
)


def test_a_stopped_and_continued_process_is_not_taken_for_a_deadlock() -> None:
    process = subprocess.Popen([sys.executable, "-c", RUNS_FOR_4_SECONDS], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        process.send_signal(signal.SIGSTOP)  # the loop and the watchdog both stand still for 3.5 s
        time.sleep(3.5)
        process.send_signal(signal.SIGCONT)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "ran to the end" in out


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


# A collection set off while prometheus_client's multiprocess lock is held (labels() of a new child encodes
# its key under it): the gc callback must not take that lock again. It once observed the histogram there,
# and the worker's event loop deadlocked for good, its consumers holding their partitions without consuming.
COLLECTS_UNDER_THE_METRICS_LOCK = textwrap.dedent(
    """
    import asyncio, gc, os, sys, tempfile
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
    from prometheus_client import Counter
    from gateway.observability import GC_PAUSES, measure_gc_pauses

    async def main():
        measuring = asyncio.create_task(measure_gc_pauses(publish_every_s=0.05))
        await asyncio.sleep(0)
        gc.set_threshold(1)  # a collection at nearly every allocation, under the lock too
        counter = Counter("kpg_gc_test_total", "children created under collections", ["child"])
        for i in range(300):
            counter.labels(str(i)).inc()
            if i % 50 == 0:
                await asyncio.sleep(0.06)  # the measurer publishes meanwhile, collections and all
        measuring.cancel()
        await asyncio.gather(measuring, return_exceptions=True)
        gc.set_threshold(700)
        timed = sum(
            s.value for m in GC_PAUSES.collect() for s in m.samples if s.name == "kpg_gc_pause_seconds_count"
        )
        print("timed", int(timed), "callbacks left", len(gc.callbacks))

    asyncio.run(main())
    """
)


def test_collections_under_the_metrics_lock_are_timed_without_deadlock() -> None:
    done = subprocess.run(
        [sys.executable, "-c", COLLECTS_UNDER_THE_METRICS_LOCK], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert int(words[1]) >= 300, done.stdout  # every collection timed, none lost to the deadlock's fix
    assert words[-1] == "0", "the gc callback outlived the measurer"
