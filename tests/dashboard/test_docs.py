"""The API's documentation at /docs, in Chromium: drawn from the installation's own files, with
nothing fetched from another origin and nothing the Content Security Policy blocks."""

from urllib.parse import urlsplit

import httpx
from playwright.sync_api import expect


def test_the_api_docs_render_offline_inside_the_csp(page, gateway):
    asked = []
    page.on("request", lambda request: asked.append(request.url))
    answer = page.goto(f"{gateway.url}/docs")
    assert answer.status == 200
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("gpuhost")
    chat = page.locator(".opblock-summary-path", has_text="/api/chat").first
    expect(chat).to_be_visible()
    chat.click()  # an operation opens, with what it takes
    expect(page.locator(".opblock-body").first).to_be_visible()
    others = {urlsplit(url).netloc for url in asked} - {urlsplit(gateway.url).netloc}
    assert not others, f"/docs fetched from other origins: {others}"


def test_fastapis_cdn_pages_are_not_served(gateway):
    assert httpx.get(f"{gateway.url}/redoc").status_code == 404
