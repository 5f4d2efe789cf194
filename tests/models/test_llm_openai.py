"""The openai engine against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import time

import pandas as pd
import pytest

from factory.framework.config import DialogueConfig, FactoryConfig
from models.engines import build_engine
from models.llm import EngineUnavailable
from tests.models.conftest import ChatServer, Reply

KEY_ENV = "FACTORY_TEST_LLM_KEY"
SECRET = "sk-test-not-for-logs-0123456789"
SCHEMA = {"type": "object", "properties": {"user": {"type": "string"}, "assistant": {"type": "string"}},
          "required": ["user", "assistant"], "additionalProperties": False}


def dialogue_config(url: str, **overrides) -> DialogueConfig:
    settings = dict(engine="openai", endpoint_url=url, model="llama-test", num_gpus=0, api_key_env=KEY_ENV,
                    request_timeout_s=2.0, max_retries=3, retry_backoff_s=0.01, max_concurrency=4)
    return DialogueConfig(**{**settings, **overrides})


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": text}]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture
def llm_api_key() -> str:
    """The chat server answers 401 unless a request carries this module's key."""
    return SECRET


def test_request_carries_model_sampling_seed_schema_and_key(chat_server):
    engine = build_engine(dialogue_config(chat_server.url, temperature=0.5, top_p=0.8, max_new_tokens=99))
    texts = engine.generate([chat("first"), chat("second")], [11, 22], SCHEMA)

    assert all(json.loads(text)["user"] for text in texts)
    by_prompt = {body["messages"][-1]["content"]: (headers, body) for headers, body in chat_server.requests}
    headers, body = by_prompt["second"]
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert (body["model"], body["seed"], body["temperature"], body["top_p"], body["max_tokens"]) == (
        "llama-test", 22, 0.5, 0.8, 99)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert SECRET not in json.dumps(engine.describe())


@pytest.mark.parametrize("field, expected", [
    ("structured_outputs", {"structured_outputs": {"json": SCHEMA}}),
    ("guided_json", {"guided_json": SCHEMA}),
])
def test_schema_goes_into_the_configured_field(chat_server, field, expected):
    engine = build_engine(dialogue_config(chat_server.url, structured_output=field))
    engine.generate([chat("x")], [1], SCHEMA)
    body = chat_server.requests[0][1]
    assert {key: body[key] for key in expected} == expected
    assert "response_format" not in body


def test_unconstrained_request_has_no_schema(chat_server):
    build_engine(dialogue_config(chat_server.url)).generate([chat("x")], [1], None)
    assert not {"response_format", "structured_outputs", "guided_json"} & chat_server.requests[0][1].keys()


def test_server_errors_are_retried_until_success(chat_server):
    chat_server.rule("flaky", Reply(status=500), Reply(status=503), Reply(status=429, retry_after="0"), Reply())
    texts = build_engine(dialogue_config(chat_server.url)).generate([chat("flaky one"), chat("fine")], [1, 2])

    assert all(json.loads(text) for text in texts)
    assert chat_server.calls["flaky"] == 4


def test_slow_answer_times_out_then_retry_succeeds(chat_server):
    chat_server.rule("slow", Reply(delay_s=3.0), Reply())
    engine = build_engine(dialogue_config(chat_server.url, request_timeout_s=0.4))
    started = time.monotonic()
    [text] = engine.generate([chat("slow one")], [1])

    assert json.loads(text)["assistant"]
    assert chat_server.calls["slow"] == 2
    assert time.monotonic() - started < 2.5  # did not wait for the slow answer


def test_client_error_fails_that_prompt_only_without_retry(chat_server):
    chat_server.rule("too long", Reply(status=400))
    texts = build_engine(dialogue_config(chat_server.url)).generate([chat("too long prompt"), chat("ok")], [1, 2])

    assert texts[0] is None and json.loads(texts[1])
    assert chat_server.calls["too long"] == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_fails_that_prompt_and_the_key_never_goes_where_it_points(chat_server, status, caplog):
    with ChatServer() as elsewhere:
        chat_server.rule("moved", Reply(status=status, location=elsewhere.url + "/chat/completions"))
        engine = build_engine(dialogue_config(chat_server.url))
        texts = engine.generate([chat("moved"), chat("ok")], [1, 2])

    assert texts[0] is None and json.loads(texts[1])
    assert chat_server.calls["moved"] == 1 and elsewhere.requests == []
    assert f"HTTP {status}: the endpoint redirects" in caplog.text and SECRET not in caplog.text


@pytest.mark.parametrize("setting, said", [
    ({"model": "llama-2-70b"}, "HTTP 404: the endpoint serves no such model"),
    ({"api_key_env": "OTHER_KEY"}, "HTTP 401: the endpoint refused the API key"),
])
def test_a_wrong_model_or_key_fails_the_call_instead_of_rejecting_every_prompt(chat_server, monkeypatch, setting, said):
    monkeypatch.setenv("OTHER_KEY", "not-the-key")
    engine = build_engine(dialogue_config(chat_server.url, **setting))
    with pytest.raises(EngineUnavailable, match=said) as raised:
        engine.generate([chat("one"), chat("two")], [1, 2])

    assert len(chat_server.requests) == 2  # not retried
    assert SECRET not in str(raised.value) and "not-the-key" not in str(raised.value)


def test_malformed_envelope_is_retried_then_fails_that_prompt(chat_server):
    chat_server.rule("broken", Reply(raw=b"<html>bad gateway</html>"))
    texts = build_engine(dialogue_config(chat_server.url, max_retries=2)).generate([chat("broken"), chat("ok")], [1, 2])

    assert texts[0] is None and texts[1] is not None
    assert chat_server.calls["broken"] == 3


def test_concurrency_is_bounded(chat_server):
    for n in range(6):
        chat_server.rule(f"job{n}", Reply(delay_s=0.2))
    engine = build_engine(dialogue_config(chat_server.url, max_concurrency=2))
    texts = engine.generate([chat(f"job{n}") for n in range(6)], list(range(6)))

    assert len(texts) == 6 and all(texts)
    assert chat_server.max_in_flight == 2


def test_unreachable_endpoint_raises_without_leaking_the_key(caplog):
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = build_engine(dialogue_config(f"http://127.0.0.1:{port}/v1", max_retries=1))  # credentials: refused
    with caplog.at_level(logging.DEBUG), pytest.raises(EngineUnavailable) as failure:
        engine.generate([chat("a"), chat("b")], [1, 2])

    assert "connection failed" in str(failure.value)
    for text in (str(failure.value), caplog.text):
        assert SECRET not in text


def test_dialogue_stage_over_openai_retries_and_rejects_malformed(chat_server):
    from stages.dialogue import Dialogue

    malformed = 'Sure! Here is the conversation: {"user": "Put my dog in the snow", "assistant": "Here'
    chat_server.rule("in the snow", Reply(content=malformed))
    chat_server.rule("on the beach", Reply(status=500), Reply(content="```json\n{\"user\": \"x\"}\n```"), Reply())
    chat_server.rule("as a chef", Reply(content=json.dumps({"user": "a dog as a chef", "assistant": "The dog cooks."})))
    dialogue = dialogue_config(chat_server.url, max_attempts=3, batch_size=2)
    config = FactoryConfig.model_validate({"dialogue": dialogue.model_dump()})
    rows = pd.DataFrame({
        "key": ["k-snow", "k-beach", "k-chef", "k-park", "k-dead"],
        "subject": ["dog"] * 5,
        "domain": ["object"] * 5,
        "instruction": ["a dog in the snow", "a dog on the beach", "a dog as a chef", "a dog in a park",
                        "a dog in space"],
        "reject_stage": [None, None, None, None, "filter"],
        "reject_reason": [None, None, None, None, "filter_dino"],
    })

    out = Dialogue(config)(rows).set_index("key")

    assert len(out) == 5
    assert out.loc["k-snow", "reject_reason"] == "not_json"
    assert out.loc["k-chef", "reject_reason"] == "echoes_instruction"
    assert chat_server.calls["in the snow"] == 3  # one request per attempt
    # 500 (engine retry) -> missing_field (stage retry, new seed) -> accepted
    assert pd.isna(out.loc["k-beach", "reject_reason"]) and out.loc["k-beach", "dialogue_attempts"] == 2
    assert out.loc["k-park", "dialogue_attempts"] == 1 and out.loc["k-park", "user"].startswith("Could you")
    assert out.loc["k-dead", "reject_reason"] == "filter_dino" and pd.isna(out.loc["k-dead", "dialogue_attempts"])
    assert pd.isna(out.loc["k-dead", "user"]) and pd.isna(out.loc["k-dead", "style"])
    seeds = [body["seed"] for _, body in chat_server.requests if "in the snow" in body["messages"][-1]["content"]]
    assert len(set(seeds)) == 3  # each attempt draws with a new seed


def dialogue_rows(instructions: dict[str, str]) -> pd.DataFrame:
    n = len(instructions)
    return pd.DataFrame({"key": list(instructions), "subject": ["dog"] * n, "domain": ["object"] * n,
                         "instruction": list(instructions.values()), "reject_stage": [None] * n,
                         "reject_reason": [None] * n})


def test_answer_cut_short_is_retried_then_that_rows_engine_error(chat_server, caplog):
    from stages.dialogue import Dialogue

    chat_server.rule("cut short", Reply(raw=b'{"choices": [{"message"', length=4096))  # then the server closes
    dialogue = dialogue_config(chat_server.url, max_attempts=1, max_retries=2, batch_size=2)
    config = FactoryConfig.model_validate({"dialogue": dialogue.model_dump()})

    with caplog.at_level(logging.INFO):
        out = Dialogue(config)(dialogue_rows({"k-cut": "a dog with a cut short tail", "k-park": "a dog in a park"}))

    out = out.set_index("key")
    assert out.loc["k-cut", "reject_reason"] == "engine_error"
    assert chat_server.calls["cut short"] == 3 and "IncompleteRead" in caplog.text
    assert pd.isna(out.loc["k-park", "reject_reason"]) and out.loc["k-park", "user"].startswith("Could you")


def test_endpoint_that_does_not_speak_http_fails_that_prompt_naming_it_not_the_key(chat_server, caplog):
    chat_server.rule("not http", Reply(wire=b"SSH-2.0-OpenSSH_9.6\r\n"))
    engine = build_engine(dialogue_config(chat_server.url, max_retries=1))
    with caplog.at_level(logging.INFO):
        texts = engine.generate([chat("not http"), chat("ok")], [1, 2])

    assert texts[0] is None and json.loads(texts[1])
    assert chat_server.calls["not http"] == 2
    assert "BadStatusLine" in caplog.text and engine.safe_url in caplog.text and SECRET not in caplog.text


def test_deeply_nested_envelope_is_malformed(chat_server):
    chat_server.rule("nested", Reply(raw=b"[" * 20_000 + b"]" * 20_000))
    texts = build_engine(dialogue_config(chat_server.url, max_retries=1)).generate([chat("nested"), chat("ok")], [1, 2])

    assert texts[0] is None and json.loads(texts[1])
    assert chat_server.calls["nested"] == 2


@pytest.mark.parametrize("reply", [
    Reply(drip_s=0.05),  # the body a byte at a time, each well inside the timeout: the whole answer ~10 s
    Reply(header_drip_s=0.05),  # one header line without end, a byte every 50 ms
], ids=["body", "headers"])
def test_a_dripping_answer_is_cut_off_at_the_request_timeout(chat_server, caplog, reply):
    chat_server.rule("drip", reply)
    engine = build_engine(dialogue_config(chat_server.url, request_timeout_s=0.5, max_retries=1))
    started = time.monotonic()
    texts = engine.generate([chat("drip"), chat("ok")], [1, 2])

    assert texts[0] is None and json.loads(texts[1])
    assert chat_server.calls["drip"] == 2 and "no whole answer within 0.5s" in caplog.text
    assert time.monotonic() - started < 2.5


def test_oversized_answer_is_refused_unread(chat_server, caplog):
    envelope = json.dumps({"choices": [{"message": {"role": "assistant", "content": "{}"}}]}).encode()
    chat_server.rule("huge", Reply(raw=envelope + b" " * 32 * 2**20))  # valid JSON, far past any 512-token answer
    engine = build_engine(dialogue_config(chat_server.url, max_retries=1, max_new_tokens=512))
    texts = engine.generate([chat("huge"), chat("ok")], [1, 2])

    assert texts[0] is None and json.loads(texts[1])
    assert chat_server.calls["huge"] == 2 and "answer larger than" in caplog.text
    deadline = time.monotonic() + 2
    while chat_server.cut_off < 2 and time.monotonic() < deadline:  # the server sees the client hang up
        time.sleep(0.01)
    assert chat_server.cut_off == 2
