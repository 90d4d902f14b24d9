"""The web pages in a real browser: Debian's chromium driven by Playwright (`make test-deps` installs it; skipped
without it, failing when CI=true), against the service and the fake upstream.

With SAVE_UI_SCREENSHOTS=1, test_screenshots_for_the_docs saves docs/assets/ui-playground.png and
docs/assets/ui-dashboard.png (docs/ui.md shows them); otherwise it is skipped, so a test run changes no file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import ROOT, TOKEN, Service, StartService, panel_config, wait_until
from tests.fake_upstream import FakeUpstream

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page

MEMBERS = ["alpha", "beta", "gamma"]
TEXTS = {
    "alpha": "Yes: 97 has no divisor between 2 and 9.",
    "beta": "97 is prime, the largest below 100.",
    "gamma": "Prime. Its square root is under 10 and none of 2, 3, 5, 7 divides it.",
}
ANSWER = "97 is prime: no prime up to its square root (2, 3, 5, 7) divides it."
QUESTION = "Is 97 prime?"
WAIT_MS = 20_000  # how long an expectation on the page waits for the state it names
NONE = "\u2013"  # what a figure not known yet shows (an en dash)


def chromium() -> str:
    """Debian's chromium; the test is skipped without it (and fails when CI=true)."""
    found = shutil.which("chromium")
    reason = "chromium is not installed (`make test-deps` installs Debian's package where apt-get can, as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found, reason = None, "Playwright for Python is not installed (requirements-dev.txt)"
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires the browser tests: {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


def ui_config(fake: FakeUpstream) -> dict[str, Any]:
    """The standard test panel's LLMs (alpha sees images, beta does not), in MoM models of the pages' tests."""
    return {
        **panel_config(fake),
        "models": [
            {"name": "mom", "llms_to_query": MEMBERS, "concluding_llm": "judge"},
            {"name": "mom-play", "llms_to_query": MEMBERS, "concluding_llm": "judge"},
            {"name": "mom-blind", "llms_to_query": ["beta"], "concluding_llm": "judge"},
            {
                "name": "mom-locked",
                "llms_to_query": MEMBERS,
                "concluding_llm": "judge",
                "overrides": {"enabled": False},
            },
        ],
    }


@pytest.fixture(scope="module")
def ui(fake_server: FakeUpstream, start_service: StartService) -> Service:
    return start_service(ui_config(fake_server))


@pytest.fixture
def answers(fake: FakeUpstream) -> FakeUpstream:
    """The fake upstream with the members' and the concluding LLM's answers scripted."""
    fake.configure({**{name: {"text": text} for name, text in TEXTS.items()}, "judge": {"text": ANSWER}})
    return fake


@dataclass
class Tab:
    """A browser tab on one of the pages, with what its console reported."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@pytest.fixture
def contexts(browser: Browser) -> Iterator[list[BrowserContext]]:
    made: list[BrowserContext] = []
    yield made
    for context in made:
        context.close()


@pytest.fixture
def open_tab(contexts: list[BrowserContext], browser: Browser) -> Any:
    def open_tab(service: Service, path: str, *, token: str | None = TOKEN, **options: Any) -> Tab:
        context = browser.new_context(base_url=service.url, **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        tab = Tab(page)
        page.on("console", tab.console)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.goto(path)
        if token is not None:
            page.fill("#token", token)
            page.press("#token", "Enter")
            page.locator("#app").wait_for(state="visible")
        return tab

    return open_tab


def ask(page: Page, question: str = QUESTION, model: str = "mom") -> None:
    page.locator("#model option").first.wait_for(state="attached")
    page.select_option("#model", model)
    page.fill("#question", question)
    page.press("#question", "Enter")


def usage(service: Service, **params: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    params = {"start": (now - timedelta(days=1)).isoformat(), "end": (now + timedelta(days=1)).isoformat(), **params}
    response = httpx.get(f"{service.base_url}/metrics/usage", headers=service.headers(), params=params, timeout=10)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


# ------------------------------------------------------------------------------------------------------ the pages


def test_the_pages_load_under_their_policy_with_no_console_error(
    ui: Service, answers: FakeUpstream, open_tab: Any
) -> None:
    from playwright.sync_api import expect

    index = open_tab(ui, "/ui", token=None)
    expect(index.page.get_by_role("link", name="Playground").first).to_be_visible()
    playground = open_tab(ui, "/ui/playground")
    expect(playground.page.locator("#model option")).to_have_count(4)
    ask(playground.page)
    expect(playground.page.locator("#breakdown-section")).to_be_visible()
    dashboard = open_tab(ui, "/ui/dashboard")
    expect(dashboard.page.locator("#table-llms tbody tr").first).to_be_visible()
    for tab in (index, playground, dashboard):
        assert tab.errors == [], tab.page.url  # a blocked script, style or connection would be one


def test_the_token_is_asked_once_and_kept_in_the_tabs_session_storage(ui: Service, open_tab: Any) -> None:
    from playwright.sync_api import expect

    tab = open_tab(ui, "/ui/playground", token=None)
    page = tab.page
    expect(page.locator("#token-section")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    expect(page.locator("#model option")).to_have_count(4)  # listed with the token
    assert page.evaluate("sessionStorage.getItem('mom-ui-token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0 and "mom-ui-token" not in page.evaluate("document.cookie")
    page.goto("/ui/dashboard")  # the same tab: not asked again
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#token-section")).to_be_hidden()
    expect(page.locator("[data-total=requests]")).not_to_have_text(NONE)
    # another tab has a session storage of its own: it asks
    other = page.context.new_page()
    other.goto("/ui/dashboard")
    expect(other.locator("#token-section")).to_be_visible()
    # a token the service refuses is forgotten and asked again
    other.fill("#token", "not-the-token")
    other.press("#token", "Enter")
    expect(other.locator("#token-error")).to_contain_text("refused")
    expect(other.locator("#token-section")).to_be_visible()
    assert other.evaluate("sessionStorage.getItem('mom-ui-token')") is None
    page.click("#forget-token")
    expect(page.locator("#token-section")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


# ----------------------------------------------------------------------------------------------------- playground


def test_member_columns_fill_before_the_synthesis_starts(ui: Service, fake: FakeUpstream, open_tab: Any) -> None:
    """The concluding LLM is held (at the fake's gate) until the page shows every member's answer: the columns fill
    from the progress stream while the answer is still empty; the gate opened, the answer and its cost follow."""
    from playwright.sync_api import expect

    fake.configure({**{name: {"text": text} for name, text in TEXTS.items()}, "judge": {"text": ANSWER, "gate": "j"}})
    page = open_tab(ui, "/ui/playground").page
    ask(page)
    for name, text in TEXTS.items():
        expect(page.locator(f'#columns [data-member="{name}"] [data-field=text]')).to_have_text(text)
        expect(page.locator(f'#columns [data-member="{name}"] [data-field=status]')).to_have_text("ok")
    fake.wait_for(lambda log: any(e["model"] == "judge" and e["outcome"] is None for e in log))
    # the concluding call is made and held: nothing of the answer has come, nothing is final
    assert page.locator("#synthesis [data-field=text]").text_content() == ""
    assert page.locator("#total-cost").text_content() == NONE
    expect(page.locator("#breakdown-section")).to_be_hidden()
    fake.open_gate("j")
    expect(page.locator("#synthesis [data-field=text]")).to_have_text(ANSWER)
    expect(page.locator("#breakdown-section")).to_be_visible()
    for name, text in TEXTS.items():  # the columns kept what they showed
        expect(page.locator(f'#columns [data-member="{name}"] [data-field=text]')).to_have_text(text)


def test_the_playground_streams_an_answer_and_shows_each_call_and_the_total_cost(
    ui: Service, answers: FakeUpstream, open_tab: Any
) -> None:
    from playwright.sync_api import expect

    page = open_tab(ui, "/ui/playground").page
    ask(page, model="mom-play")
    expect(page.locator("#synthesis [data-field=text]")).to_have_text(ANSWER)
    expect(page.locator("#breakdown-section")).to_be_visible()
    (request,) = [e for e in answers.log() if e["model"] == "judge"]
    assert request["stream"] is True  # the concluding call streamed, as the page's request did
    for name in MEMBERS:
        column = page.locator(f'#columns [data-member="{name}"]')
        expect(column.locator("[data-field=status]")).to_have_text("ok")
        for stat in ("latency", "tokens", "cost"):
            assert column.locator(f"[data-field={stat}]").text_content() not in ("", NONE, "unpriced"), (name, stat)
    rows = page.locator("#breakdown tbody tr")
    expect(rows).to_have_count(4)
    assert [rows.nth(i).locator("td").first.text_content() for i in range(4)] == [*MEMBERS, "judge"]
    wait_until(lambda: usage(ui, model="mom-play")["totals"]["requests"] == 1)
    recorded = usage(ui, model="mom-play")["totals"]["cost"]
    shown = json.loads(page.locator("#total-cost").get_attribute("data-value") or "null")
    assert recorded and shown == pytest.approx(recorded, rel=1e-9)
    assert (page.locator("#total-cost").text_content() or "").startswith("$0.0")


def test_the_image_input_is_there_where_the_model_can_see(ui: Service, open_tab: Any) -> None:
    from playwright.sync_api import expect

    page = open_tab(ui, "/ui/playground").page
    page.locator("#model option").first.wait_for(state="attached")
    page.select_option("#model", "mom")
    expect(page.locator("#image")).to_be_visible()
    page.select_option("#model", "mom-blind")
    expect(page.locator("#image")).to_be_hidden()
    page.select_option("#model", "mom-locked")  # a model that may not be steered: its controls are off
    expect(page.locator("#controls-locked")).to_have_js_property("hidden", False)
    assert page.locator("#strategy").is_disabled() and page.locator("#members input").first.is_disabled()


def test_an_attached_image_is_sent_as_a_data_url(ui: Service, answers: FakeUpstream, open_tab: Any) -> None:
    from playwright.sync_api import expect

    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c63f8cf"
        "c0f01f0005000202ffa9d8b4ad0000000049454e44ae426082"
    )
    page = open_tab(ui, "/ui/playground").page
    page.locator("#model option").first.wait_for(state="attached")
    page.select_option("#model", "mom")
    page.set_input_files("#image", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": png}])
    expect(page.locator("#image-preview")).to_be_visible()
    ask(page, "What is in this image?")
    expect(page.locator("#breakdown-section")).to_be_visible()
    (seen,) = [e for e in answers.log() if e["model"] == "alpha"]  # alpha sees images
    parts = seen["body"]["messages"][-1]["content"]
    assert {"type": "text", "text": "What is in this image?"} in parts
    assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts)


def choose_members_and_copy(page: Page, kind: str) -> str:
    """Ask only alpha and beta, by the `synthesize` strategy; copy the request as `kind`; the clipboard's text."""
    page.locator("#model option").first.wait_for(state="attached")
    page.select_option("#model", "mom")
    page.fill("#question", "Is it 'prime'? Say \"yes\" or no.")
    page.click("#controls summary")
    page.uncheck('#members input[value="gamma"]')
    page.select_option("#strategy", "synthesize")
    page.click(f"#copy-{kind}")
    page.locator("#copied-section").wait_for(state="visible")
    copied: str = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.locator("#copied").text_content()
    return copied


def test_copy_as_curl_is_a_command_that_asks_the_same(ui: Service, answers: FakeUpstream, open_tab: Any) -> None:
    tab = open_tab(ui, "/ui/playground", permissions=["clipboard-read", "clipboard-write"])
    command = choose_members_and_copy(tab.page, "curl")
    assert TOKEN not in command and "$API_TOKEN" in command
    ran = subprocess.run(
        ["bash", "-c", command], env={**os.environ, "API_TOKEN": TOKEN}, capture_output=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    frames = [f.removeprefix("data: ") for f in ran.stdout.decode().split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == ANSWER
    mom = chunks[-1]["mom"]
    assert [m["name"] for m in mom["members"]] == ["alpha", "beta"]
    assert mom["overrides"]["only"] == ["alpha", "beta"] and mom["strategy"] == "synthesize"
    asked = [e for e in answers.log() if e["model"] != "judge"]
    assert sorted(e["model"] for e in asked) == ["alpha", "beta"]
    assert asked[0]["body"]["messages"][-1]["content"] == "Is it 'prime'? Say \"yes\" or no."


def test_copy_as_python_is_a_program_that_asks_the_same(ui: Service, answers: FakeUpstream, open_tab: Any) -> None:
    tab = open_tab(ui, "/ui/playground", permissions=["clipboard-read", "clipboard-write"])
    program = choose_members_and_copy(tab.page, "python")
    assert TOKEN not in program and "extra_body=" in program
    ran = subprocess.run(
        [sys.executable, "-c", program],
        env={**os.environ, "API_TOKEN": TOKEN},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout.decode()
    assert out.startswith(ANSWER) and "cost (USD):" in out
    assert sorted(e["model"] for e in answers.log() if e["model"] != "judge") == ["alpha", "beta"]


def test_the_form_is_filled_and_submitted_with_the_keyboard(ui: Service, answers: FakeUpstream, open_tab: Any) -> None:
    from playwright.sync_api import expect

    page = open_tab(ui, "/ui/playground", token=None).page

    def tab_to(element_id: str) -> None:
        for _ in range(20):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == element_id:
                return
        raise AssertionError(f"Tab never reached #{element_id}")

    tab_to("token")
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#model option")).to_have_count(4)
    tab_to("model")
    tab_to("question")
    page.keyboard.type(QUESTION)
    tab_to("ask")
    page.keyboard.press("Enter")
    expect(page.locator("#synthesis [data-field=text]")).to_have_text(ANSWER)


@pytest.mark.parametrize("path", ["/ui", "/ui/playground", "/ui/dashboard"])
def test_a_phone_width_screen_has_no_horizontal_scroll(
    ui: Service, answers: FakeUpstream, open_tab: Any, path: str
) -> None:
    from playwright.sync_api import expect

    tab = open_tab(ui, path, token=None if path == "/ui" else TOKEN, viewport={"width": 375, "height": 812})
    page = tab.page
    if path == "/ui/playground":
        ask(page)
        expect(page.locator("#breakdown-section")).to_be_visible()
        page.click("#copy-curl")  # the longest line the page shows
    elif path == "/ui/dashboard":
        expect(page.locator("#table-llms tbody tr").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.evaluate("document.body.scrollWidth") <= 375


# ------------------------------------------------------------------------------------------------------ dashboard


@pytest.fixture(scope="module")
def counted(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """A service of its own with three requests recorded, one of them failed (its panel all failing)."""
    fake = fake_server
    fake.reset()
    service = start_service(ui_config(fake))
    fake.configure({**{name: {"text": text} for name, text in TEXTS.items()}, "judge": {"text": ANSWER}})
    assert service.chat("mom").status_code == 200
    assert service.chat("mom-play", stream=True).status_code == 200
    fake.configure({name: {"status": 500} for name in MEMBERS})
    assert service.chat("mom").status_code == 502
    wait_until(lambda: usage(service)["totals"]["requests"] == 3)
    return service


def test_the_dashboard_shows_the_totals_the_usage_api_reports(counted: Service, open_tab: Any) -> None:
    from playwright.sync_api import expect

    report = usage(counted)
    page = open_tab(counted, "/ui/dashboard").page
    expect(page.locator("[data-total=requests]")).to_have_text("3")
    for name, value in report["totals"].items():
        shown = page.locator(f'[data-total="{name}"]')
        if shown.count():
            assert json.loads(shown.get_attribute("data-value") or "") == value, name
    assert report["totals"]["errors"] == 1 and page.locator("[data-total=errors]").text_content() == "1"
    # the line over time adds up to the totals; the bars and tables name each MoM model and LLM
    series = page.evaluate("Chart.getChart('chart-requests').data.datasets.map((d) => d.data)")
    assert [sum(s) for s in series] == [3, 1]
    per_model = {g["key"]: g for g in usage(counted, group_by="model")["groups"]}
    rows = page.locator("#table-models tbody tr")
    expect(rows).to_have_count(len(per_model))
    assert page.locator('#table-models tr[data-key="mom"] td').first.text_content() == str(per_model["mom"]["requests"])
    expect(page.locator("#table-llms tbody tr")).to_have_count(4)
    bars = page.evaluate("Chart.getChart('chart-llms').data.labels")
    assert bars == sorted(["alpha", "beta", "gamma", "judge"])
    # another range: nothing in it
    page.fill("#start", "2020-01-01")
    page.fill("#end", "2020-01-31")
    page.press("#end", "Enter")
    expect(page.locator("[data-total=requests]")).to_have_text("0")
    expect(page.locator("#table-models tbody tr")).to_have_text("No requests in this range.")


def test_the_dashboard_refuses_a_range_it_cannot_ask(counted: Service, open_tab: Any) -> None:
    from playwright.sync_api import expect

    page = open_tab(counted, "/ui/dashboard").page
    expect(page.locator("[data-total=requests]")).to_have_text("3")
    page.fill("#start", "2026-03-01")
    page.fill("#end", "2026-02-01")
    page.click("#range-form button[type=submit]")
    expect(page.locator("#range-error")).to_contain_text("must not be before")
    expect(page.locator("[data-total=requests]")).to_have_text("3")  # unchanged


# ----------------------------------------------------------------------------------------------------- the docs


def test_screenshots_for_the_docs(counted: Service, fake: FakeUpstream, open_tab: Any) -> None:
    """With SAVE_UI_SCREENSHOTS=1: the playground after a live run and the dashboard, as docs/ui.md shows them."""
    from playwright.sync_api import expect

    if os.environ.get("SAVE_UI_SCREENSHOTS") != "1":
        pytest.skip("writes docs/assets/ui-*.png only with SAVE_UI_SCREENSHOTS=1")
    fake.configure({**{name: {"text": text} for name, text in TEXTS.items()}, "judge": {"text": ANSWER}})
    page = open_tab(counted, "/ui/playground", viewport={"width": 1100, "height": 900}).page
    page.click("#controls summary")  # the controls shown
    ask(page)
    expect(page.locator("#breakdown-section")).to_be_visible()
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=str(ROOT / "docs" / "assets" / "ui-playground.png"), full_page=True)
    wait_until(lambda: usage(counted)["totals"]["requests"] == 4)
    page.goto("/ui/dashboard")
    expect(page.locator("[data-total=requests]")).to_have_text("4")
    page.screenshot(path=str(ROOT / "docs" / "assets" / "ui-dashboard.png"), full_page=True)
