"""429 and 5xx bursts and timeouts from the API during up and destroy: both complete, with one pod only.

The program's providers wait 30 s for an answer; here their timeout is 2 s so that a 2.4 s answer is a
timeout (the create lands on the server after the client gave up, as a slow create does on RunPod).
"""

from __future__ import annotations

import pytest

from emulator.server import Fault
from infra.runpod_backend.provider import RunpodProvider


@pytest.fixture
def short_timeout(monkeypatch):
    retries, backoff, _ = RunpodProvider.__init__.__defaults__
    monkeypatch.setattr(RunpodProvider.__init__, "__defaults__", (retries, backoff, 2.0))


def burst(api, method: str, path: str) -> None:
    """429 (Retry-After: 0), 500, then 504 (a gateway timeout): three refusals in a row."""
    api.inject(Fault(status=429, count=1, method=method, path_prefix=path, retry_after="0"))
    for status in (500, 504):
        api.inject(Fault(status=status, count=1, method=method, path_prefix=path))


def test_up_and_destroy_complete_through_bursts_and_timeouts_without_duplicates(api_only, short_timeout):
    api = api_only.api
    burst(api, "POST", "/v2/network-volumes")
    burst(api, "GET", "/v2/pods")
    burst(api, "POST", "/v2/pods")
    api.inject(Fault(status=0, delay=2.4, method="POST", path_prefix="/v2/pods"))  # answered after the timeout
    driver = api_only.driver()
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    assert list(api.pods) == [outputs["podId"]] and len(api.volumes) == 1  # no duplicate pod or volume
    creates = [request for request in api.requests if request == ("POST", "/v2/pods")]
    assert len(creates) == 4  # three refused, one timed out (and created): then found by name, not posted again

    burst(api, "DELETE", "/v2/pods")
    burst(api, "DELETE", "/v2/network-volumes")
    api.inject(Fault(status=0, delay=2.4, method="DELETE", path_prefix="/v2/pods"))
    assert driver.destroy().counts == {"delete": 2}
    assert api.pods == {} and api.volumes == {}
