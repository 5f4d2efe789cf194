"""Token lookup (Ray's order), redaction, and fetching the cluster token from SSM (moto)."""

from __future__ import annotations

import stat

import pytest

from jobs.submit import SubmitError, auth_headers, find_token, redact

TOKEN_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in TOKEN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_lookup_follows_rays_order(home, monkeypatch):
    assert find_token() is None and auth_headers(None) == {}
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token() == "from-home"
    named = home / "named"
    named.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert find_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == "from-env"
    assert auth_headers("from-env") == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert find_token() is None


def test_a_named_token_file_that_is_missing_is_an_error_without_the_token(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "absent"))
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH is set but"):
        find_token()


def test_redact_hides_the_token():
    assert redact("403 for Bearer s3cr3t-token", "s3cr3t-token") == "403 for Bearer <redacted>"
    assert redact("no token here", None) == "no token here"


def test_token_is_fetched_from_ssm_and_written_owner_only(home, monkeypatch, capsys):
    import boto3
    from moto import mock_aws

    from jobs.__main__ import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        ssm = boto3.client("ssm", region_name="us-west-2")
        ssm.put_parameter(Name="/cafe-factory/ray-auth-token", Value="tok-123456", Type="SecureString")
        assert main(["token", "--ssm-parameter", "/cafe-factory/ray-auth-token", "--region", "us-west-2"]) == 0
    written = home / ".ray" / "auth_token"
    assert written.read_text() == "tok-123456"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert find_token() == "tok-123456"
    assert "tok-123456" not in capsys.readouterr().out
