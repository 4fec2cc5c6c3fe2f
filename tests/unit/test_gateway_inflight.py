"""The gateway's in-flight bound (publisher.InFlight): in all and per tenant, so one tenant
saturating its share is refused (429) while the others are still admitted."""

from __future__ import annotations

import pytest

from ingest_gateway.errors import Saturated, to_http
from ingest_gateway.publisher import InFlight


def test_a_tenant_over_its_share_is_refused_while_others_are_admitted():
    bound = InFlight(max_events=100, tenant_share=0.25)
    assert bound.max_tenant_events == 25
    for _ in range(12):
        bound.admit("a", 2)
    with pytest.raises(Saturated) as refused:
        bound.admit("a", 2)  # 24 + 2 > 25
    status, body, headers = to_http(refused.value)
    assert (status, body["error"]) == (429, "saturated") and (b"retry-after", b"1") in headers
    bound.admit("a", 1)  # exactly the share
    for tenant in ("b", "c", "d"):
        bound.admit(tenant, 25)
    assert bound.events == 100
    with pytest.raises(Saturated):
        bound.admit("e", 1)  # the whole bound is taken


def test_released_events_make_room_again_and_leave_no_idle_tenant():
    bound = InFlight(max_events=10, tenant_share=0.5)
    bound.admit("a", 5)
    with pytest.raises(Saturated):
        bound.admit("a", 1)
    bound.release("a", 5)
    assert bound.events == 0 and not bound._by_tenant
    bound.admit("a", 5)
    assert bound.events == 5


def test_a_request_larger_than_a_bound_goes_through_alone():
    bound = InFlight(max_events=10, tenant_share=0.5)
    bound.admit("a", 8)  # over the tenant share, but the tenant had nothing waiting
    with pytest.raises(Saturated):
        bound.admit("a", 1)
    bound.admit("b", 2)
    with pytest.raises(Saturated):
        bound.admit("c", 1)  # the whole bound is taken
    bound.release("a", 8)
    bound.release("b", 2)
    bound.admit("c", 50)  # nothing waiting at all: even over the whole bound


def test_the_share_is_at_least_one_event():
    assert InFlight(max_events=3, tenant_share=0.1).max_tenant_events == 1
