"""The consumers' one failure policy: how long a consumer pauses after failures."""

from gateway.adapters.kafka.consumer import FailurePolicy


def test_a_failing_handler_backs_off_doubling_up_to_its_cap() -> None:
    policy = FailurePolicy(backoff_s=0.2, max_backoff_s=5.0)
    assert [policy.delay(n) for n in (1, 2, 3, 6, 20)] == [0.2, 0.4, 0.8, 5.0, 5.0]


def test_an_outage_is_probed_at_least_every_second_however_long_it_lasts() -> None:
    # A consumer must resume within about a second of its backend coming back (readiness says SERVING
    # by then, and reads wait for the read side), so outages back off far less than failing handlers.
    policy = FailurePolicy(backoff_s=0.2, max_backoff_s=5.0)
    assert [policy.outage_delay(n) for n in (1, 2, 3, 4, 50)] == [0.2, 0.4, 0.8, 1.0, 1.0]
