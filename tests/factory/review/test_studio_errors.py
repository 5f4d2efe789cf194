"""Label Studio servers that fail: the token never shows, whichever call or page fails.

A small stdlib HTTP server stands in for Label Studio here: a real one cannot be made to fail on
page 2 of a task list or to echo the request's token in a 401 body. The client is the real SDK.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
import pytest

from factory.framework import layout
from factory.framework.storage import LocalStorage
from factory.versions import main

TOKEN = secrets.token_hex(20)  # a legacy (non-JWT) token: the SDK sends it as it is, `Token <key>`


def signed(token_type: str) -> str:
    claims = {"token_type": token_type, "exp": int(time.time()) + 3600, "jti": secrets.token_hex(8)}
    return jwt.encode(claims, secrets.token_bytes(32), algorithm="HS256")


# A personal access token (Label Studio >= 1.19): the SDK trades it at /api/token/refresh/ for an access
# token, and sends that, `Bearer <access token>`
PERSONAL_TOKEN, ACCESS_TOKEN = signed("refresh"), signed("access")
ACCEPTED = {f"Token {TOKEN}", f"Bearer {ACCESS_TOKEN}"}


class StandIn(BaseHTTPRequestHandler):
    """Label Studio's project and task endpoints; `fail_on(path, page)` gives the status of an error answer
    (whose body echoes the request's token) or None. Like Label Studio, it answers 401 to a request whose
    `Authorization` is neither `Token <TOKEN>` nor `Bearer <ACCESS_TOKEN>`, before any scripted failure, and
    trades PERSONAL_TOKEN for ACCESS_TOKEN at /api/token/refresh/; `seen` keeps each GET's header."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if urlparse(self.path).path != "/api/token/refresh/":
            self.answer(404, {"detail": "not found"})
        elif body.get("refresh") == PERSONAL_TOKEN:
            self.answer(200, {"access": ACCESS_TOKEN})
        else:  # simplejwt's answer
            self.answer(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})

    fail_on = staticmethod(lambda path, page: None)
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        page = int(parse_qs(url.query).get("page", ["1"])[0])
        said = self.headers.get("Authorization")
        self.seen.append(said)
        if said not in ACCEPTED:
            # Django REST framework's answer, as Label Studio gives it
            self.answer(401, {"detail": "Invalid token." if said else
                              "Authentication credentials were not provided."})
            return
        failure = self.fail_on(url.path, page)
        if failure:
            self.answer(failure, self.echo())
        elif url.path.startswith("/api/projects/"):
            self.answer(200, {"id": 1, "title": "review"})
        elif url.path == "/api/tasks/":
            self.answer(200, {"tasks": [{"id": page, "data": {"key": f"k{page}"}, "annotations": []}],
                              "total": 3, "total_annotations": 0, "total_predictions": 0})
        else:
            self.answer(404, {"detail": "not found"})

    def echo(self) -> str:
        """A body that quotes the request's token many times, so one copy straddles any cut."""
        said = self.headers.get("Authorization", "")
        return " ".join(f"[{n}] you sent {said!r}" for n in range(40))

    def answer(self, status: int, body) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    servers = []

    def start(fail_on):
        handler = type("Handler", (StandIn,), {"fail_on": staticmethod(fail_on), "seen": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        start.seen = handler.seen
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def review_import(tmp_path, url, monkeypatch, capsys, token: str = TOKEN) -> tuple[int, str]:
    """`versions review import demo/v1` against `url`, from a review record written by hand."""
    root = tmp_path / "root"
    record = {"dataset": "demo", "version": "v1", "project_id": 1, "url": url, "created": "2026-12-06T00:00:00",
              "tasks": 3, "published_samples": 3, "frame": {"size": 0}, "origins": {"k1": "published"}}
    LocalStorage(root).write_bytes(layout.review_record("demo", "v1", 1), json.dumps(record).encode())
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    code = main(["--set", f"storage.root={root}", "--set", "dataset=demo", "review", "import", "demo/v1"])
    out, err = capsys.readouterr()
    return code, out + err


def leaked_pieces(text: str, secrets: tuple[str, ...] = (TOKEN,)) -> list[str]:
    """Every run of 8 characters of a secret that `text` holds."""
    return [secret[i:i + 8] for secret in secrets for i in range(len(secret) - 7) if secret[i:i + 8] in text]


def test_a_server_failing_on_page_two_is_a_clear_error_without_the_token(stand_in, tmp_path, monkeypatch, capsys,
                                                                          caplog):
    url = stand_in(lambda path, page: 500 if path == "/api/tasks/" and page == 2 else None)
    code, said = review_import(tmp_path, url, monkeypatch, capsys)
    assert code == 2
    assert "list the tasks of project 1: HTTP 500" in said and len(said.strip().splitlines()) == 1
    assert "Traceback" not in said
    assert leaked_pieces(said + caplog.text) == []
    assert len(stand_in.seen) >= 3 and set(stand_in.seen) == {f"Token {TOKEN}"}  # project, page 1, page 2


def test_a_failing_server_echoing_the_access_token_traded_for_a_personal_token_never_shows_it(
        stand_in, tmp_path, monkeypatch, capsys, caplog):
    url = stand_in(lambda path, page: 500 if path == "/api/tasks/" and page == 2 else None)
    code, said = review_import(tmp_path, url, monkeypatch, capsys, token=PERSONAL_TOKEN)
    assert code == 2 and "list the tasks of project 1: HTTP 500" in said
    assert leaked_pieces(said + caplog.text, (PERSONAL_TOKEN, ACCESS_TOKEN)) == []
    assert len(stand_in.seen) >= 3 and set(stand_in.seen) == {f"Bearer {ACCESS_TOKEN}"}  # the body echoed it


def test_a_401_that_echoes_the_token_is_one_line_saying_the_token_was_refused(stand_in, tmp_path, monkeypatch,
                                                                              capsys, caplog):
    url = stand_in(lambda path, page: 401)
    code, said = review_import(tmp_path, url, monkeypatch, capsys)
    assert code == 2
    assert "refused the token in LABEL_STUDIO_API_KEY (HTTP 401)" in said and len(said.strip().splitlines()) == 1
    assert leaked_pieces(said + caplog.text) == []
    assert stand_in.seen and set(stand_in.seen) == {f"Token {TOKEN}"}  # the body echoed the real token


def test_an_error_body_cut_to_300_characters_never_holds_a_piece_of_the_token(stand_in, tmp_path, monkeypatch,
                                                                              capsys):
    url = stand_in(lambda path, page: 502 if path.startswith("/api/projects/") else None)
    code, said = review_import(tmp_path, url, monkeypatch, capsys)
    assert code == 2 and "open project 1: HTTP 502" in said
    assert leaked_pieces(said) == []
    assert stand_in.seen and set(stand_in.seen) == {f"Token {TOKEN}"}


def test_a_wrong_token_is_refused_by_the_server_and_said_so_in_one_line(stand_in, tmp_path, monkeypatch, capsys):
    url = stand_in(lambda path, page: None)
    code, said = review_import(tmp_path, url, monkeypatch, capsys, token=secrets.token_hex(20))
    assert code == 2
    assert "refused the token in LABEL_STUDIO_API_KEY (HTTP 401) when trying to open project 1" in said
    assert len(said.strip().splitlines()) == 1 and "Invalid token" not in said
    assert stand_in.seen and f"Token {TOKEN}" not in stand_in.seen


def test_a_label_studio_url_with_a_password_is_refused_and_never_repeated(stand_in, tmp_path, monkeypatch, capsys):
    """The server's URL is kept in the review record and the reviewed version's manifest."""
    host = stand_in(lambda path, page: None).removeprefix("http://")
    code, said = review_import(tmp_path, f"http://reviewer:BasicAuthPw-0123@{host}", monkeypatch, capsys)
    assert code == 2
    assert "the Label Studio URL (--url or LABEL_STUDIO_URL) is a URL with a user name or password" in said
    assert "BasicAuthPw" not in said and stand_in.seen == []
