"""`up` twice with no change: the second creates, updates and replaces nothing, and sends no write."""

from __future__ import annotations


def test_a_second_up_with_no_change_does_nothing(api_only):
    driver = api_only.driver()
    first, operations = driver.up()
    assert operations.counts == {"create": 2}
    api_only.api.requests.clear()

    second, operations = driver.up()
    assert operations.counts == {"same": 2} and operations.changes == 0
    writes = [request for request in api_only.api.requests if request[0] in ("POST", "PATCH", "DELETE")]
    assert writes == []
    assert second["podId"] == first["podId"] and len(api_only.api.pods) == 1

    assert driver.destroy().counts == {"delete": 2}
