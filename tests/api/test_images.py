"""Images: only members that can see them are asked, the concluding LLM gets them or placeholders, URLs are safe."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import TOKEN, Service, StartService, panel_config
from tests.fake_upstream import FakeUpstream
from tests.image_server import ImageServer, Reply, png_bytes
from tests.openai_schema import validate

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()


def image_question(url: str = PNG, detail: str = "high") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url, "detail": detail}},
            ],
        }
    ]


def sent_to(fake: FakeUpstream, model: str) -> list[dict[str, Any]]:
    entries = [e for e in fake.log() if e["model"] == model]
    assert len(entries) == 1, (model, entries)
    messages: list[dict[str, Any]] = entries[0]["body"]["messages"]
    return messages


def images_in(messages: list[dict[str, Any]]) -> list[str]:
    return [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


def test_only_members_that_see_images_are_asked_and_a_blind_judge_gets_placeholders(
    service: Service, fake: FakeUpstream
) -> None:
    fake.configure({"alpha": {"text": "A red bicycle against a wall."}, "judge": {"text": "It shows a red bicycle."}})
    response = service.chat("mom", messages=image_question())
    assert response.status_code == 200
    body = response.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == "It shows a red bicycle."

    assert images_in(sent_to(fake, "alpha")) == [PNG]
    called = {e["model"] for e in fake.log()}
    assert called == {"alpha", "judge"}  # beta (multimodal: false) and gamma (unknown to LiteLLM) were not asked

    members = {m["name"]: m for m in body["mom"]["members"]}
    assert members["alpha"]["status"] == "ok" and members["alpha"]["images"] == "sent"
    for name in ("beta", "gamma"):
        assert members[name]["status"] == "skipped"
        assert "cannot see images" in members[name]["error"]
        assert members[name]["usage"] is None and members[name]["cost"] == 0
    assert body["mom"]["asked"] == 1 and body["mom"]["answered"] == 1
    assert body["mom"]["degraded"] is False

    judge = sent_to(fake, "judge")
    assert images_in(judge) == []
    conversation = judge[1]["content"]
    assert "What is in this picture?" in conversation and "[image 1: not shown to you" in conversation
    assert "A red bicycle against a wall." in judge[-1]["content"]
    assert 'name="beta"' not in judge[-1]["content"]  # skipped members are not offered as answers
    assert body["mom"]["concluding"]["images"] == "placeholders"


def test_a_judge_that_sees_images_gets_them_streaming(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"alpha": {"text": "A cat."}, "seer": {"text": "A cat on a mat."}})
    frames = [
        p
        for _, p in service.sse(
            {
                "model": "mom-vision-judge",
                "messages": image_question(),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    ]
    assert frames[-1] == "[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "A cat on a mat."
    mom = chunks[-1]["mom"]
    assert mom["concluding"]["images"] == "sent"
    assert [m["status"] for m in mom["members"]] == ["ok", "skipped", "skipped"]
    assert images_in(sent_to(fake, "seer")) == [PNG]
    assert images_in(sent_to(fake, "alpha")) == [PNG]


def test_image_in_an_earlier_turn_counts(service: Service, fake: FakeUpstream) -> None:
    conversation = [
        *image_question(),
        {"role": "assistant", "content": "A bicycle."},
        {"role": "user", "content": "What colour is it?"},
    ]
    assert service.chat("mom", messages=conversation).status_code == 200
    assert {e["model"] for e in fake.log()} == {"alpha", "judge"}
    assert images_in(sent_to(fake, "alpha")) == [PNG]


@pytest.mark.parametrize("stream", [False, True])
def test_no_member_can_see_images_is_a_400_naming_the_model(service: Service, fake: FakeUpstream, stream: bool) -> None:
    response = service.chat("mom-blind", messages=image_question(), stream=stream)
    assert response.status_code == 400
    error = response.json()["error"]
    validate(response.json(), "ErrorResponse")
    assert error["code"] == "images_not_supported"
    assert "'mom-blind'" in error["message"] and "beta" in error["message"]
    assert fake.log() == []


def test_models_say_which_accept_images(service: Service) -> None:
    models = httpx.get(f"{service.base_url}/models", headers=service.headers()).json()
    vision = {m["id"]: m["capabilities"]["vision"] for m in models["data"]}
    assert vision["mom"] is True  # alpha can
    assert vision["mom-blind"] is False
    assert vision["mom-catalog"] is True  # gpt-4o-mini: LiteLLM's model info says it sees images
    one = httpx.get(f"{service.base_url}/models/mom-blind", headers=service.headers()).json()
    validate(one, "Model")
    assert one["capabilities"] == {"vision": False, "tools": True, "structured_output": True}


def test_sdk_image_request(service: Service, fake: FakeUpstream) -> None:
    fake.configure({"judge": {"text": "Described."}})
    client = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0)
    completion = client.chat.completions.create(model="mom", messages=image_question())  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Described."


@pytest.mark.parametrize("url", ["http://no-such-host.invalid/x.png", "https://images.example.invalid/cat.png"])
def test_a_name_that_does_not_resolve_is_400_and_reaches_nobody(service: Service, fake: FakeUpstream, url: str) -> None:
    response = service.chat("mom", messages=image_question(url))
    assert response.status_code == 400
    error = response.json()["error"]
    validate(response.json(), "ErrorResponse")
    assert (error["code"], error["param"]) == ("invalid_image_url", "messages[0].content[1].image_url.url")
    assert "does not resolve" in error["message"]
    assert fake.log() == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/image.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://2130706433/x.png",
        "http://localhost/x.png",
        "file:///etc/passwd",
        "data:text/html;base64,PGgxPg==",
        "data:image/png;base64,@@@",
    ],
)
def test_unsafe_image_urls_are_400_and_reach_nobody(service: Service, fake: FakeUpstream, url: str) -> None:
    url = url.format(port=fake.port)
    response = service.chat("mom", messages=image_question(url))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_image_url"
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert fake.log() == []


def test_private_urls_allowed_when_configured(fake_server: FakeUpstream, start_service: StartService) -> None:
    service = start_service(panel_config(fake_server), {"MOM_ALLOW_PRIVATE_IMAGE_URLS": "true"})
    fake_server.reset()
    served = png_bytes()
    with ImageServer({"/image.png": Reply(served)}) as images:
        url = images.url("/image.png")
        assert service.chat("mom", messages=image_question(url)).status_code == 200
        assert images.paths() == ["/image.png"]
    # alpha, an OpenAI-compatible server, gets the bytes the service downloaded, not the URL
    assert images_in(sent_to(fake_server, "alpha")) == ["data:image/png;base64," + base64.b64encode(served).decode()]
    # the other checks still hold
    assert service.chat("mom", messages=image_question("file:///etc/passwd")).status_code == 400


def test_too_many_images(service: Service, fake: FakeUpstream) -> None:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": PNG}} for _ in range(21)]
    response = service.chat("mom", messages=[{"role": "user", "content": parts}])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_images"
    assert fake.log() == []
