"""Debian's Chromium, driven by Playwright, as a person uses the pages: every page a test opens
records what the browser complains of (console errors, uncaught exceptions, Content Security
Policy violations), and the test fails if there was anything."""

import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

# Chromium's flags for a closed network (no background connections refused at every start)
QUIET = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")  # not the session's: Playwright's loop would stay running
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    assert executable, "the browser tests need Debian's chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=QUIET)
        yield launched
        launched.close()


class Complaints(list):
    """What the browser reported as wrong, from every page of a context. A test that opens a
    page answered with an error status on purpose says so (`expect_status`): Chromium logs
    each such answer as a console error."""

    def __init__(self):
        super().__init__()
        self.statuses: set[int] = set()

    def expect_status(self, *statuses: int) -> None:
        self.statuses.update(statuses)

    def unexpected(self) -> list[str]:
        expected = [f"responded with a status of {status} " for status in self.statuses]
        return [c for c in self if not any(e in c for e in expected)]

    def watch(self, page: Page) -> Page:
        page.on(
            "console",
            lambda message: message.type == "error" and self.append(f"console: {message.text}"),
        )
        page.on("pageerror", lambda error: self.append(f"uncaught: {error}"))
        # a CSP violation is an event on the document too (Chromium also logs it)
        page.add_init_script(
            """document.addEventListener('securitypolicyviolation', e =>
                 console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))"""
        )
        return page


@pytest.fixture
def complaints() -> Complaints:
    return Complaints()


@pytest.fixture
def open_context(browser, complaints) -> Iterator:
    """Makes browser contexts (with options, e.g. a phone's viewport) whose pages are watched;
    the test fails on anything they complained of."""
    made: list[BrowserContext] = []

    def make(**options) -> BrowserContext:
        context = browser.new_context(**options)
        context.on("page", complaints.watch)
        made.append(context)
        return context

    yield make
    for context in made:
        context.close()
    unexpected = complaints.unexpected()
    assert not unexpected, "the browser complained:\n" + "\n".join(unexpected)


@pytest.fixture
def page(open_context) -> Page:
    return open_context().new_page()
