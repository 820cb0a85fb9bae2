"""The soak test, bounded: load-idle cycles against a real gateway (see loadtest/soak.py for what it does
and checks). `make soak` runs the same for ten minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.soak import Soak, SoakConfig
from tests.conftest import Backends

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(400)
async def test_load_idle_cycles_leave_nothing_wedged_lost_or_duplicated(
    backends: Backends, tmp_path: Path
) -> None:
    config = SoakConfig(
        bootstrap_servers=backends.bootstrap_servers,
        redis_url=backends.redis_url,
        workdir=tmp_path,
        duration_s=50,
        appenders=16,
        batch_appenders=2,
        requesters=6,
        quitters=6,
    )
    report = await Soak(config).run()
    print(report.summary())
    assert report.cycles >= 3 and report.killed_clients >= 3
    assert report.outcomes["append:ok"] > 100 and report.outcomes["cancelled"] > 10
    assert report.outcomes["request:replied"] > 0 and report.outcomes["request:REPLY_TIMEOUT"] > 0
    assert len(report.probe_ms) == 6 * report.cycles
    assert report.violations == [], report.summary()
