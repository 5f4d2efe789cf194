"""Label Studio through its SDK (`label-studio-sdk`): one project per export, tasks in, votes out.

The server is named by `--url` or `LABEL_STUDIO_URL`; the credential is a personal access token
(Label Studio: Account & Settings > Personal Access Token) in `LABEL_STUDIO_API_KEY`, read from
the environment only, never from the command line, and never written anywhere: error messages
carry the server's status and body with the token masked, and review records and manifests name
the server by URL only. The SDK trades the token for short-lived access tokens itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from factory.framework.config import no_credentials
from factory.review.verdicts import VERDICTS, Vote

URL_VARIABLE = "LABEL_STUDIO_URL"
TOKEN_VARIABLE = "LABEL_STUDIO_API_KEY"
TASK_BATCH = 100  # tasks per import request: each carries two data-URI images
VERDICT_FIELD, REASON_FIELD = "verdict", "reason"

LABEL_CONFIG = """<View>
  <Header value="Does x~ follow the instruction and keep the subject of x? Are y and y~ sound?"/>
  <View style="display:flex;gap:12px">
    <View style="flex:1"><Header value="x (reference)" size="6"/><Image name="x" value="$x"/></View>
    <View style="flex:1"><Header value="x~ (new image)" size="6"/><Image name="x_new" value="$x_new"/></View>
  </View>
  <Header value="instruction" size="6"/><Text name="instruction" value="$instruction"/>
  <Header value="y (user)" size="6"/><Text name="user" value="$user"/>
  <Header value="y~ (assistant)" size="6"/><Text name="assistant" value="$assistant"/>
  <Choices name="verdict" toName="x_new" choice="single" required="true" showInline="true">
    <Choice value="keep"/>
    <Choice value="drop"/>
  </Choices>
  <TextArea name="reason" toName="x_new" placeholder="why (optional)" maxSubmissions="1" editable="true"/>
</View>"""


class ReviewError(RuntimeError):
    """A review cannot be exported or imported; the message says why (and never holds the token)."""


BODY_LIMIT = 300  # characters of a server's error body quoted in a message
_END = object()


# What a server's error body may quote of a request's credentials besides the configured token: the SDK
# trades a personal access token (a JWT) for short-lived access tokens, sent as `Bearer <access token>`.
CREDENTIALS = re.compile(r"\b(Bearer|Token)(\s+)[\w.~+/=-]{16,}|eyJ[\w-]+\.[\w-]+\.[\w-]*")


def masked(text: str) -> str:
    token = os.environ.get(TOKEN_VARIABLE)
    text = text.replace(token, "***") if token else text
    return CREDENTIALS.sub(lambda found: f"{found[1]}{found[2]}***" if found[1] else "***", text)


def one_line(text: str, limit: int = BODY_LIMIT) -> str:
    """`text` on one line, masked first and only then cut to `limit` characters (a cut cannot split the token)."""
    text = " ".join(masked(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def server_url(url: str | None) -> str:
    url = url or os.environ.get(URL_VARIABLE)
    if not url:
        raise ReviewError(f"name the Label Studio server with --url or {URL_VARIABLE}")
    try:
        return no_credentials(url).rstrip("/")
    except ValueError as err:  # the server's URL goes into the review record and the manifest
        raise ReviewError(f"the Label Studio URL (--url or {URL_VARIABLE}) is {err} ({TOKEN_VARIABLE})") from None


def connect(url: str | None):
    """An SDK client for the server, authenticated by the personal access token in LABEL_STUDIO_API_KEY."""
    try:
        from label_studio_sdk import LabelStudio  # the optional `review` extra
    except ImportError:
        raise ReviewError('reviews need the Label Studio SDK: pip install -e ".[review]"') from None
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        raise ReviewError(f"set {TOKEN_VARIABLE} to a Label Studio personal access token")
    base_url = server_url(url)
    return call(f"connect to {base_url}", LabelStudio, base_url=base_url, api_key=token, timeout=120)


def call(what: str, function, *args, **kwargs):
    """Run one SDK call; its failure becomes a one-line ReviewError naming `what`, status and body, token
    masked before anything is cut. A refused token (401, 403) says so, without the server's body."""
    from label_studio_sdk.core.api_error import ApiError  # the optional `review` extra

    try:
        return function(*args, **kwargs)
    except ApiError as err:
        if err.status_code in (401, 403):
            raise ReviewError(f"Label Studio refused the token in {TOKEN_VARIABLE} (HTTP {err.status_code}) "
                              f"when trying to {what}: it is invalid, expired or lacks access; mint a new "
                              "personal access token") from None
        raise ReviewError(one_line(f"Label Studio refused to {what}: HTTP {err.status_code}: {err.body}")) from None
    except Exception as err:  # httpx transport errors, token refresh failures
        raise ReviewError(one_line(f"could not {what}: {type(err).__name__}: {err}")) from None


def each(what: str, items: Iterable[Any]) -> Iterator[Any]:
    """Iterate an SDK pager through `call`: fetching page 2, 3, ... fails as clearly as the first call."""
    iterator = call(what, iter, items)
    while (item := call(what, next, iterator, _END)) is not _END:
        yield item


def create_project(client, title: str, description: str) -> int:
    project = call("create a project", client.projects.create, title=title[:50], description=description,
                   label_config=LABEL_CONFIG, show_skip_button=False, sampling="Uniform sampling")
    return int(project.id)


def import_tasks(client, project_id: int, tasks: Iterable[dict[str, Any]]) -> int:
    """Send the tasks in batches of TASK_BATCH; returns how many were sent."""
    sent, batch = 0, []
    for task in tasks:
        batch.append({"data": task})
        if len(batch) == TASK_BATCH:
            sent += _send(client, project_id, batch)
            batch = []
    if batch:
        sent += _send(client, project_id, batch)
    return sent


def _send(client, project_id: int, batch: list[dict[str, Any]]) -> int:
    call(f"import tasks into project {project_id}", client.projects.import_tasks, id=project_id, request=batch)
    return len(batch)


def project_tasks(client, project_id: int) -> Iterator[Any]:
    what = f"list the tasks of project {project_id}"
    yield from each(what, call(what, client.tasks.list, project=project_id, fields="all"))


def read_ballots(client, project_id: int) -> Iterator[Vote | str]:
    """Every annotation of the project, in Label Studio's order: a Vote, or the reason it is ignored."""
    call(f"open project {project_id}", client.projects.get, id=project_id)
    for task in project_tasks(client, project_id):
        key = (task.data or {}).get("key")
        for annotation in task.annotations or []:
            yield annotation_vote(key, annotation if isinstance(annotation, dict) else annotation.dict())


def annotation_vote(key: Any, record: dict[str, Any]) -> Vote | str:
    """One annotation as a Vote, or why it is not one (see verdicts.IGNORED)."""
    if record.get("was_cancelled"):
        return "cancelled"
    reviewer = record.get("completed_by")
    if isinstance(reviewer, dict):
        reviewer = reviewer.get("id")
    if reviewer is None or reviewer == "":
        return "no_reviewer"
    choices, reason = [], ""
    for name, value in result_values(record.get("result")):
        if name == VERDICT_FIELD:
            choices += as_list(value.get("choices"))
        elif name == REASON_FIELD and value.get("text"):
            reason = "\n".join(str(line) for line in as_list(value["text"]))
    if len(choices) > 1:
        return "several_choices"
    if not choices or choices[0] not in VERDICTS:
        return "no_verdict"
    return Vote(key=key if isinstance(key, str) else "", reviewer=utf8_text(f"user-{reviewer}"), verdict=choices[0],
                reason=utf8_text(reason))


def utf8_text(text: str) -> str:
    """`text` with any lone surrogate (JSON's "\\ud800", which UTF-8 cannot hold) as "?": it goes
    into the votes' digest, the verdicts table and the report."""
    return text.encode("utf-8", "replace").decode("utf-8")


def result_values(result: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(from_name, value) of each region of an annotation's result; the server's JSON is not trusted
    to have the shape Label Studio gives it, so anything else reads as no region."""
    for region in result if isinstance(result, list) else []:
        if isinstance(region, dict) and isinstance(region.get("value"), dict):
            yield region.get("from_name"), region["value"]


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
