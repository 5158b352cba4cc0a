"""The web chat page in a real headless Chromium (Debian's package, driven by Playwright): type a
question, watch the streamed answer appear, continue the conversation, clear it; desktop and phone width."""

import json
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from test_serve import running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)"),
]
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(model, tok):
    with running_server(model, tok, max_batch=2) as (url, _):
        yield url


def ask(page, question: str):
    """Type a question, press Enter, wait for the answer to finish; returns the request body sent."""
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.fill("#input", question)
        page.press("#input", "Enter")
    asked = page.locator(".msg.assistant").count()
    page.locator('.msg.assistant[data-done="true"]').nth(asked - 1).wait_for(timeout=60_000)
    return json.loads(request.value.post_data)


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)], ids=["desktop", "phone"])
def test_chat_page_streams_answers(browser, url, tmp_path, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    assert page.title() == "ChatGLM-6B"

    # Settings: greedy, a short answer.
    page.click("summary")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", "24")
    assert page.text_content("#temperature-value") == "0"
    page.click("summary")

    sent = ask(page, "你好")
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 24
    assert sent["messages"] == [{"role": "user", "content": "你好"}]
    answer = page.locator(".msg.assistant").last
    assert answer.inner_text().strip()
    assert int(answer.get_attribute("data-chunks")) > 1  # the text arrived in several streamed pieces

    sent = ask(page, "写一首诗")  # the second turn carries the first round
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    page.screenshot(path=str(tmp_path / f"chat-{width}.png"), full_page=True)

    page.click("#clear")
    assert page.locator(".msg").count() == 0
    sent = ask(page, "abc")
    assert sent["messages"] == [{"role": "user", "content": "abc"}]
    assert not errors, errors
    page.close()


def test_markdown_rendering_escapes_model_output(browser, url):
    page = browser.new_page()
    page.goto(url + "/")
    html = page.evaluate("renderMarkdown('# Title\\n<img src=x onerror=alert(1)> **bold** `a<b`\\n"
                         "- item\\n\\n```python\\nprint(\"<script>\")\\n```')")
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html and "<code>a&lt;b</code>" in html
    assert "<ul><li>item</li></ul>" in html
    assert "<pre><code>print(&quot;&lt;script&gt;&quot;)</code></pre>" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    page.close()
