"""Drives switchboard's operators' page (`/status`) in headless Chromium.

Run by tests/cli.rs against a fresh server that has a session key:

    python3 tests/e2e/status.py --url http://127.0.0.1:PORT --artifacts DIR --session-key KEY
        [--chromium PATH]

Steps: a conversation is created through the API -> `/status` sends the browser to the login
form -> the key is typed in -> back on `/status`, the totals count it running and the list
shows it -> its live tail is opened (the plain socket route) -> a message posted through the
API appears in the tail -> `/docs` renders the API's operations with the Swagger UI compiled
into the binary; no request of the whole run leaves the server. Screenshots go to DIR
(`status-*.png`). Prints one JSON line; exits non-zero on any failure.
"""

import asyncio
import json
import sys
import urllib.request

from playwright.async_api import async_playwright

from browser import arguments, launch, screenshot_failure

MESSAGE = "hello from the status page test"


def api(url, key, method, path, body=None):
    """An API request with the key in its header; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("X-Session-API-Key", key)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def scenario(page, url, key, artifacts):
    foreign = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:"))
            else foreign.append(r.url))
    created = api(url, key, "POST", "/api/conversations", {})
    conversation_id = created["conversation_id"]

    await page.goto(url + "/status")
    assert "/login" in page.url, page.url
    await page.locator("#key").fill(key)
    await page.locator("input[type=submit]").click()
    await page.wait_for_url(url + "/status")

    row = page.locator(f'[data-testid=conversation-row][data-conversation-id="{conversation_id}"]')
    await row.wait_for()
    await page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=total-running]').textContent) >= 1")
    # A second poll has happened: the rate is a number.
    await page.wait_for_function(
        "() => /^[0-9.]+$/.test(document.querySelector('[data-testid=total-events-rate]')"
        ".textContent)")
    await page.screenshot(path=f"{artifacts}/status-1-listed.png", full_page=True)

    await row.get_by_test_id("tail-button").click()
    lines = page.get_by_test_id("tail-line")
    # Attached: the socket sends at least the conversation's status first.
    await lines.first.wait_for()
    await page.wait_for_function(
        f"""() => [...document.querySelectorAll('[data-testid=conversation-row]')]
                .some(r => r.dataset.conversationId === {json.dumps(conversation_id)}
                      && r.cells[4].textContent === '1')""")
    before = await lines.count()
    accepted = api(url, key, "POST", f"/api/conversations/{conversation_id}/events",
                   {"action": "message", "args": {"content": MESSAGE}})
    assert accepted.get("success") is True, accepted
    await lines.filter(has_text=MESSAGE).first.wait_for()
    assert await lines.count() > before
    await page.screenshot(path=f"{artifacts}/status-2-tail.png", full_page=True)
    tail_lines = await lines.count()

    # /docs: Swagger UI, from the binary, renders the API's operations.
    await page.goto(url + "/docs")
    await page.locator(".swagger-ui .info .title").wait_for()
    operations = page.locator(".opblock")
    await operations.first.wait_for()
    assert await page.locator(".opblock-summary-path", has_text="/api/conversations").count()
    await page.screenshot(path=f"{artifacts}/status-3-docs.png", full_page=True)
    assert not foreign, f"requests left the server: {foreign}"
    return {"tail_lines": tail_lines, "docs_operations": await operations.count()}


async def main():
    args = arguments(key_required=True)
    error, report = None, {}
    async with async_playwright() as p:
        context, page = await launch(p, args.chromium)
        try:
            report = await scenario(page, args.url, args.session_key, args.artifacts)
        except Exception as e:  # report, then fail below
            error = f"{type(e).__name__}: {e}"
            await screenshot_failure(page, f"{args.artifacts}/status-FAILED.png")
        await context.close()
    print(json.dumps({"ok": error is None, "error": error, **report}))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
