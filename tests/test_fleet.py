"""A fleet loses no call: three replicas on loopback addresses behind one round-robin client; one killed, one drained,
one added (loadtest/fleet.py). Bounded: loopback only, about 25 s."""

from __future__ import annotations

from loadtest.fleet import ADDED_SHARE, ADDED_WITHIN_S, ADDRESSES, run_fleet


def test_a_replica_killed_one_drained_and_one_added_fail_no_call_and_the_new_one_takes_its_share() -> None:
    run = run_fleet(clients=3, phase_seconds=2.5, max_connection_age=5.0)
    assert run.failed == 0, run.codes
    killed, drained, kept, added = ADDRESSES
    before_kill = [i for i, t in enumerate(run.ticks) if t <= 2.5]
    for address in (killed, drained, kept):  # round-robin: each of the three answers its part from the start
        assert sum(run.served[address][i] for i in before_kill) > 0.15 * sum(
            run.served[a][i] for a in ADDRESSES for i in before_kill
        )
    # no tick without answers: a kill or a drain never stalls the client while the rest of the fleet serves
    assert all(sum(run.served[a][i] for a in ADDRESSES) > 0 for i in range(len(run.ticks))), run.served
    assert run.added_within() is not None and run.added_within() <= ADDED_WITHIN_S, run.events
    last = run.served[added][-1] / sum(run.served[a][-1] for a in ADDRESSES)
    assert last >= ADDED_SHARE, last
