"""Stored Responses on PostgreSQL, shared by replicas: one replica stores a response, another continues it
(`previous_response_id`), retrieves it and deletes it; another token on either gets a 404."""

from __future__ import annotations

import openai
import pytest

from tests.api.test_responses import OTHER_TOKEN, responses_config
from tests.conftest import TOKEN, StartService
from tests.fake_upstream import FakeUpstream


def test_a_replica_continues_what_another_stored(
    fake_server: FakeUpstream, start_service: StartService, postgres_url: str
) -> None:
    fake_server.reset()
    env = {"DATABASE_URL": postgres_url, "API_TOKEN": f"{TOKEN},{OTHER_TOKEN}"}
    first, second = (start_service(responses_config(fake_server), env) for _ in range(2))
    one = openai.OpenAI(base_url=first.base_url, api_key=TOKEN, max_retries=0)
    two = openai.OpenAI(base_url=second.base_url, api_key=TOKEN, max_retries=0)
    stored = one.responses.create(model="mom", input="My name is Ada.")
    fake_server.clear_log()
    continued = two.responses.create(model="mom", input="What is my name?", previous_response_id=stored.id)
    (concluding,) = [e["body"] for e in fake_server.log() if e["model"] == "judge"]
    assert concluding["messages"][1:-1] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Answer from judge."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert one.responses.retrieve(continued.id).previous_response_id == stored.id
    other = openai.OpenAI(base_url=second.base_url, api_key=OTHER_TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(stored.id)
    two.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        one.responses.retrieve(stored.id)
