"""What the browser tests share: headless Chromium launched through Playwright.

Imported by tests/e2e/webapp.py and tests/e2e/status.py (run from this directory's scripts,
so it is on their path).
"""

import argparse
import atexit
import shutil
import tempfile

STEP_TIMEOUT_MS = 20_000


async def launch(playwright, chromium):
    """A fresh headless Chromium (its own profile, no background traffic) and its page. The
    profile directory is removed when the script exits."""
    profile = tempfile.mkdtemp(prefix="switchboard-e2e-profile-")
    atexit.register(shutil.rmtree, profile, ignore_errors=True)
    context = await playwright.chromium.launch_persistent_context(
        profile,
        executable_path=chromium,
        headless=True,
        args=["--no-sandbox", "--headless", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              "--disable-quic"],
    )
    context.set_default_timeout(STEP_TIMEOUT_MS)
    page = context.pages[0] if context.pages else await context.new_page()
    return context, page


async def screenshot_failure(page, path):
    """A full-page screenshot of a failed run at `path`; a page that cannot be shot any more
    (closed, crashed) leaves none, and the run's own error is what gets reported."""
    try:
        await page.screenshot(path=path, full_page=True)
    except Exception:
        pass


def arguments(key_required=False):
    """The command line every browser test takes: the server, where screenshots go, the
    browser, and the server's session key."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--session-key", required=key_required, default=None)
    return parser.parse_args()
