"""The dev stack's broker with a cluster id that starts with "-" (1 in 64 random ids do)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.adapters.kafka import kafka_answers
from gateway.devstack import DevStack

pytestmark = pytest.mark.integration


def test_a_cluster_id_starting_with_a_dash_formats_and_starts(tmp_path: Path) -> None:
    # Before: `StorageTool format -t -Ryn7...` read the id as a flag and `kpg dev up` failed.
    (tmp_path / "kafka").mkdir(parents=True)
    (tmp_path / "kafka" / "cluster.id").write_text("-Ryn7_cvRdWntEY8rSY8kQ\n")
    stack = DevStack(tmp_path)
    try:
        info = stack.up(kafka_port=0, controller_port=0, redis_port=0)
        assert kafka_answers(info.bootstrap_servers, 10)
    finally:
        stack.down()
