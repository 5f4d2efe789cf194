"""Token lookup (Ray's order), redaction, and fetching the cluster token from SSM (moto's server)."""

from __future__ import annotations

import stat

import pytest

from jobs.submit import StreamRedactor, SubmitError, auth_headers, find_token, redact, stream_logs

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


def test_token_is_fetched_from_ssm_and_written_owner_only(home, s3_server, monkeypatch, capsys):
    """`jobs token` reads SSM over HTTP from moto's server (which serves SSM beside S3); the command takes
    no endpoint, so botocore finds the server through AWS_ENDPOINT_URL_SSM."""
    import uuid

    import boto3

    from jobs.__main__ import main

    parameter = f"/cafe-factory/ray-auth-token-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", s3_server)
    ssm = boto3.client("ssm", region_name="us-west-2", endpoint_url=s3_server)
    ssm.put_parameter(Name=parameter, Value="tok-123456\n", Type="SecureString")
    assert main(["token", "--ssm-parameter", parameter, "--region", "us-west-2"]) == 0
    written = home / ".ray" / "auth_token"
    assert written.read_text() == "tok-123456"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert find_token() == "tok-123456"
    assert "tok-123456" not in capsys.readouterr().out


def test_a_leftover_0644_partial_is_recreated_and_the_token_ends_0600(home):
    from jobs.auth_token import write_token

    folder = home / ".ray"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    partial = folder / ".auth_token.partial"
    partial.write_text("stale-bytes-that-are-longer-than-the-token")
    partial.chmod(0o644)
    watcher = home / "watcher"  # a second name for the leftover: whoever holds it must not read the token
    watcher.hardlink_to(partial)
    written = write_token("tok-abcdef")
    assert written.read_text() == "tok-abcdef"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert watcher.read_text() == "stale-bytes-that-are-longer-than-the-token"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not partial.exists()


@pytest.mark.parametrize("where", ["partial", "token"])
def test_a_symlink_in_the_token_files_place_is_refused_and_not_followed(home, where):
    from jobs.auth_token import TokenFileError, write_token

    folder = home / ".ray"
    folder.mkdir()
    victim = home / "victim"
    victim.write_text("victim")
    victim.chmod(0o644)
    link = folder / (".auth_token.partial" if where == "partial" else "auth_token")
    link.symlink_to(victim)
    with pytest.raises(TokenFileError, match="symlink"):
        write_token("tok-abcdef")
    assert victim.read_text() == "victim"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert link.is_symlink()


def test_the_token_command_refuses_a_symlink_with_exit_2(home, monkeypatch, capsys):
    from jobs.__main__ import main

    monkeypatch.setattr("jobs.auth_token.fetch_token", lambda parameter, region=None, endpoint_url=None: "tok-9")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").symlink_to(home / "elsewhere")
    assert main(["token", "--ssm-parameter", "/p"]) == 2
    assert "is a symlink" in capsys.readouterr().err
    assert not (home / "elsewhere").exists()


TOKEN = "s3cr3t-token-0123456789"


def test_redaction_holds_across_every_chunk_boundary():
    text = f"log line one\nAuthorization: Bearer {TOKEN}\nthe end {TOKEN}"
    for cut in range(len(text) + 1):
        for second_cut in (cut, min(len(text), cut + 3)):
            redactor = StreamRedactor(TOKEN)
            chunks = [text[:cut], text[cut:second_cut], text[second_cut:]]
            out = "".join(redactor.feed(chunk) for chunk in chunks) + redactor.flush()
            assert out == redact(text, TOKEN), (cut, second_cut)


def test_a_log_cut_off_inside_the_token_ends_redacted():
    redactor = StreamRedactor(TOKEN)
    assert redactor.feed(f"line\nBearer {TOKEN[:-1]}") + redactor.flush() == "line\nBearer <redacted>"
    redactor = StreamRedactor(TOKEN)
    assert redactor.feed(f"ends with {TOKEN[:3]}") + redactor.flush() == f"ends with {TOKEN[:3]}"


class TailingClient:
    """Ray's JobSubmissionClient, as far as `stream_logs` uses it: the logs in given chunks."""

    def __init__(self, chunks: list[str]):
        self.chunks = chunks

    async def tail_job_logs(self, job_id: str):
        for chunk in self.chunks:
            yield chunk


def test_streamed_job_logs_never_print_a_token_split_between_two_chunks():
    import asyncio
    import io

    out = io.StringIO()
    chunks = ["starting\ntoken is " + TOKEN[:9], TOKEN[9:] + "\n", "done"]
    asyncio.run(stream_logs(TailingClient(chunks), "job-1", out, TOKEN))
    assert out.getvalue() == "starting\ntoken is <redacted>\ndone"
