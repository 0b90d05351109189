"""Drives the real OpenHands web app, served by switchboard, in headless Chromium.

Run by tests/e2e.rs against a fresh server:

    python3 tests/e2e/webapp.py --url http://127.0.0.1:PORT --artifacts DIR [--chromium PATH]
        [--session-key KEY]

With --session-key the server has a key: the browser first opens `/?session_api_key=KEY` (the
cookie login), and everything after runs on the cookie alone; the API refuses a client without
it. Steps: the first-run modals answered -> Launch -> chat -> the echo rendered -> reload -> the
conversation listed -> rename -> stop -> resume -> delete -> the settings page. A screenshot per
step goes to DIR. Every /api answer the app receives is watched: a 401, 403, 404 or 5xx fails
the run (with a key, the login cookie must authenticate everything), except `git/changes`' 404 "Not a git repository" and the `GET /api/settings` 404 that opens the
first-run modal before anything is saved (both are OpenHands' protocol). Prints one JSON line
with the measured times; exits non-zero on any failure.
"""

import asyncio
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from playwright.async_api import async_playwright

from browser import STEP_TIMEOUT_MS, arguments, launch, screenshot_failure

MESSAGE = "hello from the browser test, with a longer first line"
TITLE = MESSAGE[:30] + "..."
RENAMED = "Renamed by the browser test"
SECOND = "back again after a stop"


class Run:
    def __init__(self, page, artifacts):
        self.page = page
        self.artifacts = artifacts
        self.step_no = 0
        self.failures = []
        self.settings_saved = False
        self.pending = set()
        self.key = None
        page.on("response", self.on_response)

    def on_response(self, response):
        if "/api/" not in response.url:
            return
        if response.status in (401, 403, 404) or response.status >= 500:
            task = asyncio.ensure_future(self.check_refusal(response))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def check_refusal(self, response):
        method, url, status = response.request.method, response.url, response.status
        try:
            body = await response.text()
        except Exception:
            # The page navigated away before the body was read: ask the same question again.
            body = await asyncio.get_running_loop().run_in_executor(
                None, self.answer_now, method, url)
        if status == 404 and re.search(r"/git/changes$", url.split("?")[0]):
            if re.search(r"not a git repository", body, re.I):
                return
        if (status == 404 and method == "GET" and url.split("?")[0].endswith("/api/settings")
                and not self.settings_saved):
            return
        self.failures.append(f"{status} {method} {url}: {body[:200]}")

    def answer_now(self, method, url):
        """The body the server gives `url` now (GET only; the key in the header if any)."""
        if method != "GET":
            return ""
        request = urllib.request.Request(url)
        if self.key:
            request.add_header("X-Session-API-Key", self.key)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.read().decode("utf-8", "replace")
        except OSError:
            return ""

    async def step(self, name):
        self.step_no += 1
        path = f"{self.artifacts}/{self.step_no:02d}-{name}.png"
        await self.page.screenshot(path=path, full_page=True)
        print(f"step {self.step_no:02d} {name}: ok", file=sys.stderr, flush=True)

    async def api(self, method, path):
        """A request from inside the page (same origin, same cookies)."""
        return await self.page.evaluate(
            """async ([method, path]) => {
                const r = await fetch(path, {method});
                return {status: r.status, body: await r.json()};
            }""",
            [method, path],
        )

    async def chat_enabled(self):
        await self.page.wait_for_function(
            """() => { const t = document.querySelector('[data-testid=chat-input] textarea');
                       return t && !t.disabled; }""",
            timeout=STEP_TIMEOUT_MS,
        )

    async def send(self, text):
        box = self.page.get_by_test_id("chat-input").locator("textarea")
        await box.fill(text)
        # Right after a resume the box can be enabled a moment before the app takes a message
        # (it keeps the text then): press Enter again until the app has taken it.
        for _ in range(20):
            await box.press("Enter")
            try:
                await self.page.wait_for_function(
                    """() => { const t = document.querySelector('[data-testid=chat-input] textarea');
                               return t && t.value === ''; }""",
                    timeout=1000,
                )
                break
            except Exception:
                continue
        await self.page.get_by_test_id("agent-message").filter(has_text=text).first.wait_for()

    def card(self, title):
        return (self.page.get_by_test_id("conversation-panel")
                .get_by_test_id("conversation-card").filter(has_text=title))

    async def open_panel(self):
        if not await self.page.get_by_test_id("conversation-panel").count():
            await self.page.get_by_test_id("toggle-conversation-panel").click()
        await self.page.get_by_test_id("conversation-panel").wait_for()

    async def confirm(self):
        button = self.page.get_by_role("button", name=re.compile("^confirm", re.I))
        await button.click()
        await button.wait_for(state="detached")

    async def card_menu(self, title, item):
        await self.open_panel()
        card = self.card(title)
        await card.wait_for()
        await card.get_by_test_id("ellipsis-button").click()
        await self.page.get_by_test_id(item).click()


async def first_run(run):
    page = run.page
    await page.get_by_test_id("ai-config-modal").wait_for()
    provider = page.get_by_test_id("llm-provider-input")
    await provider.click()
    await provider.fill("Anthropic")
    await page.get_by_role("option", name="Anthropic").first.click()
    model = page.get_by_test_id("llm-model-input")
    await model.click()
    await page.get_by_role("option", name="claude-sonnet-4-20250514").first.click()
    await page.get_by_test_id("llm-api-key-input").fill("sk-browser-test")
    run.settings_saved = True
    await page.get_by_test_id("save-settings-button").click()
    await page.get_by_test_id("ai-config-modal").wait_for(state="detached")
    await run.step("ai-provider-saved")

    await page.get_by_test_id("user-capture-consent-form").wait_for()
    await page.get_by_role("checkbox").uncheck()
    await page.get_by_test_id("confirm-preferences").click()
    await page.get_by_test_id("user-capture-consent-form").wait_for(state="detached")
    await run.step("analytics-declined")
    settings = await run.api("GET", "/api/settings")
    assert settings["status"] == 200, settings
    assert settings["body"]["llm_api_key_set"] is True, settings
    assert settings["body"]["llm_api_key"] is None, settings
    assert settings["body"]["user_consents_to_analytics"] is False, settings


def status_without_credentials(url):
    """The status of an /api request carrying no key and no cookie."""
    try:
        with urllib.request.urlopen(url + "/api/options/config", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


async def scenario(run):
    page = run.page
    timings = {}
    if run.key:
        assert status_without_credentials(run.url) == 401
        await page.goto(run.url + "/?session_api_key=" + urllib.parse.quote(run.key))
        # The key leaves the address bar; the HttpOnly cookie carries it from now on.
        assert "session_api_key" not in page.url, page.url
        cookies = await page.context.cookies()
        assert any(c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies), cookies
    else:
        await page.goto(run.url + "/")
    await first_run(run)

    started = time.monotonic()
    await page.get_by_test_id("header-launch-button").click()
    await page.wait_for_url(re.compile(r".*/conversations/[0-9a-f]+$"))
    await run.chat_enabled()
    timings["launch_to_chat_enabled_ms"] = round((time.monotonic() - started) * 1000)
    conversation_id = page.url.rstrip("/").split("/")[-1]
    await run.step("launched")

    await run.send(MESSAGE)
    await run.step("echo-rendered")

    await page.reload()
    await page.get_by_test_id("user-message").filter(has_text=MESSAGE).first.wait_for()
    await page.get_by_test_id("agent-message").filter(has_text=MESSAGE).first.wait_for()
    await run.step("history-after-reload")

    # The list shows it, titled from the first message.
    await run.open_panel()
    await run.card(TITLE).wait_for()
    await run.step("listed")

    await run.card_menu(TITLE, "edit-button")
    title_input = page.get_by_test_id("conversation-panel").locator("input").first
    await title_input.fill(RENAMED)
    await title_input.press("Enter")
    await run.card(RENAMED).wait_for()
    info = await run.api("GET", f"/api/conversations/{conversation_id}")
    assert info["body"]["title"] == RENAMED, info
    await run.step("renamed")

    await run.card_menu(RENAMED, "stop-button")
    await run.confirm()
    await run.open_panel()
    await run.card(RENAMED).get_by_test_id("STOPPED-indicator").wait_for()
    info = await run.api("GET", f"/api/conversations/{conversation_id}")
    assert info["body"]["status"] == "STOPPED", info
    await run.step("stopped")

    # Resume: open it from the list and chat again.
    await page.goto(run.url + "/")
    await run.open_panel()
    await run.card(RENAMED).get_by_test_id("conversation-card-title").click()
    await page.wait_for_url(re.compile(f".*/conversations/{conversation_id}$"))
    await run.chat_enabled()
    await run.send(SECOND)
    info = await run.api("GET", f"/api/conversations/{conversation_id}")
    assert info["body"]["status"] == "RUNNING", info
    await run.step("resumed")

    await run.card_menu(RENAMED, "delete-button")
    await run.confirm()
    await run.card(RENAMED).wait_for(state="detached")
    info = await run.api("GET", f"/api/conversations/{conversation_id}")
    assert info["body"] is None, info
    await run.step("deleted")

    await page.goto(run.url + "/settings")
    await page.get_by_test_id("llm-api-key-input").wait_for()
    assert not await page.get_by_text("Request failed").count()
    await run.step("settings-page")
    return timings


async def main():
    args = arguments()
    async with async_playwright() as p:
        context, page = await launch(p, args.chromium)
        run = Run(page, args.artifacts)
        run.url = args.url
        run.key = args.session_key
        error = None
        timings = {}
        try:
            timings = await scenario(run)
        except Exception as e:  # report, then fail below
            error = f"step {run.step_no + 1} failed: {type(e).__name__}: {e}"
            await screenshot_failure(page, f"{args.artifacts}/{run.step_no + 1:02d}-FAILED.png")
        await asyncio.sleep(0.5)
        if run.pending:
            await asyncio.gather(*run.pending, return_exceptions=True)
        await context.close()
    print(json.dumps({"ok": error is None and not run.failures, "error": error,
                      "api_failures": run.failures, "steps": run.step_no, **timings}))
    return 0 if error is None and not run.failures else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
