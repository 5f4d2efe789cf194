"""The submitter keeps watching its job through failed status requests: its timeout holds only while it watches."""

from __future__ import annotations

import io

import pytest
from ray.job_submission import JobStatus

from jobs import submit


class FlakyStatus:
    """`JobSubmissionClient.get_job_status` (same signature) failing `failures` times, then answering."""

    def __init__(self, failures: int):
        self.failures = failures
        self.asked = 0

    def get_job_status(self, job_id: str) -> JobStatus:
        self.asked += 1
        if self.asked <= self.failures:
            raise ConnectionError("the dashboard restarted")
        return JobStatus.SUCCEEDED


def test_a_few_failed_status_requests_do_not_lose_the_job():
    client = FlakyStatus(failures=submit.STATUS_ATTEMPTS - 1)
    assert submit.wait_for_end(client, "nightly-1", None, 0.001, io.StringIO()) == "SUCCEEDED"
    assert client.asked == submit.STATUS_ATTEMPTS


def test_a_status_that_keeps_failing_is_given_up_on():
    with pytest.raises(ConnectionError):
        submit.wait_for_end(FlakyStatus(failures=10**6), "nightly-1", None, 0.001, io.StringIO())
