"""The billing dashboard in a real headless Chromium (Debian's, driven by Playwright) against
the running gateway, with seeded usage."""

import re
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from billing import tenants, usage
from billing.db import transaction
from billing.keys import well_formed
from billing.models import AuditEntry, Tenant
from billing.plans import period_of
from harness.helpers import auth, dashboard_sign_in
from harness.processes import wait_for
from tests.conftest import ADMIN_TOKEN, running_gateway

LLAVA, SD = "llava-llama3", "stable-diffusion"


def seed(sessions, tenant_id, model: str, kind: str, seconds: list[float], days_ago: float):
    """Records finished `days_ago` days before now, a few seconds apart, all of them inside
    this billing period and before now whatever the date: on the 1st of a month "two days
    ago" is last month's, so there they move to the middle of the period's elapsed part."""
    now = datetime.now(UTC)
    start = period_of(now).start
    when = max(now - timedelta(days=days_ago), start + (now - start) / 2)
    step = min(timedelta(seconds=1), (when - start) / (2 * len(seconds)))
    with transaction(sessions) as session:
        for i, value in enumerate(seconds):
            usage.record(
                session,
                usage.UsageCreate(
                    request_id=uuid.uuid4().hex,
                    tenant_id=tenant_id,
                    api_key_id=None,
                    model=model,
                    kind=kind,
                    status="completed",
                    gpu_seconds=value,
                    queue_seconds=0.01,
                    prompt_tokens=600,
                    output_tokens=1 if kind == "txt2img" else 40,
                    started_at=None,
                    finished_at=when - step * i,
                ),
            )


@pytest.fixture
def tenant_a(sessions, tenant_factory):
    """A Pro tenant with 30 chat requests today and 2 image requests two days ago."""
    tenant_id, key, key_id = tenant_factory.create("pro")
    seed(sessions, tenant_id, LLAVA, "chat", [0.5] * 30, days_ago=0)
    seed(sessions, tenant_id, SD, "txt2img", [4.0, 1.25], days_ago=2)
    return tenant_id, key, key_id, 30 * 0.5 + 4.0 + 1.25


def sign_in(page: Page, gateway, credential: str) -> None:
    page.goto(f"{gateway.url}/dashboard")
    expect(page).to_have_url(f"{gateway.url}/dashboard/login")
    page.get_by_label("API key or admin token").fill(credential)
    page.get_by_role("button", name="Sign in").click()


def drawn(chart) -> dict[str, float]:
    """GPU-seconds by model as the chart's bars say them (each bar's title)."""
    found: dict[str, float] = {}
    for title in chart.locator("rect.bar title").all_text_contents():
        model, seconds = title.split(" · ", 1)[1].split(": ")
        found[model] = found.get(model, 0.0) + float(seconds.split()[0].replace(",", ""))
    return found


def labelled(page: Page) -> bool:
    """Every visible form control has a label or an accessible name."""
    return page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), select, button')]
                 .every(e => (e.labels && e.labels.length) || e.getAttribute('aria-label')
                             || (e.tagName === 'BUTTON' && e.textContent.trim()))"""
    )


def test_a_tenant_sees_its_usage_and_manages_its_keys(page, gateway, tenant_a):
    _, key, _, total = tenant_a
    sign_in(page, gateway, key)
    expect(page).to_have_url(f"{gateway.url}/dashboard/usage")
    expect(page.locator("#plan")).to_contain_text("Pro")
    expect(page.locator("#used")).to_have_text(f"{total:.3f}")
    expect(page.locator("#invoice-total")).to_have_text("$20.00")  # all within the allowance
    expect(page.locator("#allowance")).to_contain_text("of 36,000.000 GPU-seconds used")
    chart = page.locator("#chart")
    assert drawn(chart) == pytest.approx({LLAVA: 15.0, SD: 5.25})
    expect(page.locator("#chart-total")).to_have_text(f"{total:.3f}")
    expect(chart.locator(".legend")).to_contain_text(f"{SD}: 5.250")
    assert labelled(page)
    for chosen, buckets, hours in (("24h", 25, True), ("7d", 8, False), ("30d", 31, False)):
        page.get_by_label("Range", exact=True).select_option(chosen)  # as a person does: no button
        expect(page).to_have_url(re.compile(rf"range={chosen}"))
        # every bucket of the range, the empty ones too, and ticks for the unit: hours, or
        # days without an hour
        expect(chart).to_have_attribute("data-buckets", str(buckets))
        ticks = chart.locator("text.tick").all_text_contents()
        assert ticks and all((":00" in tick) == hours for tick in ticks), (chosen, ticks)
        expect(page.locator("#chart-title")).to_contain_text("UTC")
    # one model: the chart and its total are that model's, as the table is
    page.get_by_label("Model", exact=True).select_option(SD)
    page.get_by_role("button", name="Filter").click()
    assert drawn(chart) == pytest.approx({SD: 5.25})
    expect(page.locator("#chart-total")).to_have_text("5.250")
    expect(page.locator("#chart-title")).to_contain_text(SD)
    page.goto(f"{gateway.url}/dashboard/usage")

    rows = page.locator("#requests tbody tr")
    expect(rows).to_have_count(25)  # page 1 of 32 requests
    page.get_by_role("link", name="Older").click()
    expect(rows).to_have_count(7)
    page.get_by_label("Model", exact=True).select_option(SD)
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(2)
    for text in rows.locator("td:nth-child(2)").all_inner_texts():
        assert text == SD

    page.get_by_role("link", name="API keys").click()
    page.get_by_role("button", name="Create key").click()
    made = page.locator("#new-key").inner_text().strip()
    assert well_formed(made)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("#new-key-copied")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == made
    assert httpx.get(f"{gateway.url}/api/balance", headers=auth(made)).status_code == 200
    page.get_by_role("button", name=f"Revoke key ending {made[-4:]}").click()
    expect(page).to_have_url(f"{gateway.url}/dashboard/keys")
    wait_for(
        lambda: httpx.get(f"{gateway.url}/api/balance", headers=auth(made)).status_code == 401,
        10,
        "the revoked key to be refused by the API",
    )
    assert labelled(page)

    page.get_by_role("button", name="Sign out").click()
    page.goto(f"{gateway.url}/dashboard/usage")
    expect(page).to_have_url(f"{gateway.url}/dashboard/login")


def test_a_tenant_without_usage_is_told_so(page, gateway, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    sign_in(page, gateway, key)
    expect(page.locator("#chart-empty")).to_contain_text("No usage in this range yet")
    expect(page.locator("#chart")).to_have_count(0)
    expect(page.locator("#requests tbody")).to_contain_text("No requests yet.")


def test_the_session_cookie_is_http_only_and_strict(page, gateway, tenant_a):
    sign_in(page, gateway, tenant_a[1])
    [cookie] = [c for c in page.context.cookies() if c["name"] == "gpuhost_session"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"


def test_a_tenant_cannot_reach_another_tenants_data_or_operator_pages(
    page, complaints, gateway, tenant_a, tenant_factory, sessions
):
    complaints.expect_status(403, 404)
    other_id, other_key, other_key_id = tenant_factory.create("max")
    seed(sessions, other_id, LLAVA, "chat", [7.777], days_ago=0)
    sign_in(page, gateway, tenant_a[1])
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    stolen = page.request.post(
        f"{gateway.url}/dashboard/keys/{other_key_id}/revoke", form={"csrf": csrf}
    )
    assert stolen.status == 404
    assert httpx.get(f"{gateway.url}/api/balance", headers=auth(other_key)).status_code == 200
    page.goto(f"{gateway.url}/dashboard/usage?model={LLAVA}")
    assert "7.777" not in page.content()
    for path in ("/dashboard/admin", f"/dashboard/admin/tenants/{other_id}"):
        refused = page.goto(f"{gateway.url}{path}")
        assert refused.status == 403
        expect(page.locator(".error")).to_contain_text("operator pages need the admin token")


def test_forms_without_the_sessions_csrf_token_are_refused(page, gateway, tenant_a):
    sign_in(page, gateway, tenant_a[1])
    forged = page.request.post(f"{gateway.url}/dashboard/keys", form={"scope": "inference"})
    assert forged.status == 403


def test_revoking_the_sessions_own_key_ends_the_session(page, gateway, tenant_a):
    sign_in(page, gateway, tenant_a[1])
    page.goto(f"{gateway.url}/dashboard/keys")
    page.get_by_role("button", name=f"Revoke key ending {tenant_a[1][-4:]}").click()
    expect(page).to_have_url(f"{gateway.url}/dashboard/login")


def test_bad_credentials_are_named(page, complaints, gateway):
    complaints.expect_status(401)
    page.goto(f"{gateway.url}/dashboard/login")
    page.get_by_label("API key or admin token").fill("gph_" + "A" * 30)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That key is not valid.")


def test_an_operator_sees_everyone_and_changes_a_tier(page, gateway, tenant_a, sessions):
    tenant_id, _, _, total = tenant_a
    sign_in(page, gateway, ADMIN_TOKEN)
    expect(page).to_have_url(f"{gateway.url}/dashboard/admin")
    row = page.locator(f"tr[data-tenant-id='{tenant_id}']")
    expect(row.locator("td").nth(2)).to_have_text(f"{total:.3f}")
    assert labelled(page)
    row.get_by_label("Tier of").select_option("max")
    row.get_by_role("button", name="Set").click()
    expect(page.locator(f"tr[data-tenant-id='{tenant_id}'] td.tier")).to_have_text("max")
    with sessions() as session:
        assert session.get(Tenant, tenant_id).tier == "max"
        entry = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.target == str(tenant_id))
            .order_by(AuditEntry.id.desc())
        ).first()
    assert entry.action == "tenant.set_tier" and entry.detail == {"before": "pro", "after": "max"}

    page.locator(f"tr[data-tenant-id='{tenant_id}'] a").click()
    # the tenant's usage, as the tenant sees it, then its keys
    expect(page.locator("#used")).to_have_text(f"{total:.3f}")
    assert drawn(page.locator("#chart")) == pytest.approx({LLAVA: 15.0, SD: 5.25})
    page.get_by_role("button", name="Issue key").click()
    issued = page.locator("#new-key").inner_text().strip()
    assert httpx.get(f"{gateway.url}/api/balance", headers=auth(issued)).status_code == 200


def test_pages_fit_a_phone(open_context, gateway, tenant_a):
    """At 375 px wide nothing makes the page scroll sideways (wide tables scroll in place)."""
    for credential, paths in (
        (tenant_a[1], ("/dashboard/usage", "/dashboard/keys")),
        (ADMIN_TOKEN, ("/dashboard/admin", f"/dashboard/admin/tenants/{tenant_a[0]}")),
    ):
        fits_a_phone(open_context, gateway, credential, paths)


def fits_a_phone(open_context, gateway, credential: str, paths) -> None:
    context = open_context(viewport={"width": 375, "height": 812}, is_mobile=True)
    page = context.new_page()
    sign_in(page, gateway, credential)
    for path in paths:
        page.goto(f"{gateway.url}{path}")
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        wide = page.evaluate(
            """() => [...document.querySelectorAll('body *')]
                .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
                .map(e => e.tagName + '.' + e.className + '#' + e.id).slice(0, 8)"""
        )
        assert overflow <= 0, (path, overflow, wide)


def test_the_outbox_card_says_when_stripe_is_not_configured(stack_env, tmp_path_factory):
    """A stack without Stripe (as `gpuhost dev` is): the unsent records are no alarm."""
    env = stack_env | {"GPUHOST_STRIPE_WEBHOOK_SECRET": ""}
    for gateway in running_gateway("gateway-without-stripe", env, tmp_path_factory):
        with httpx.Client(base_url=gateway.url) as browser:
            assert dashboard_sign_in(browser, ADMIN_TOKEN).status_code == 303
            card = browser.get("/dashboard/admin").text
        assert "Stripe not configured: usage is kept in PostgreSQL only" in card


def dashboard_csrf(client: httpx.Client) -> str:
    page = client.get("/dashboard/keys")
    assert page.status_code == 200, page.text
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


class TestKeyScopes:
    """A dashboard session carries the scopes of the key that opened it: making and revoking
    keys needs `keys:write`, and a key made there has no scope its maker lacks."""

    def test_a_usage_only_session_can_neither_mint_nor_revoke(self, gateway, tenant_factory):
        tenant_id, full_key, full_id = tenant_factory.create("pro")
        with transaction(tenant_factory.sessions) as session:
            _, reader = tenants.create_key(session, tenant_id, ("usage:read",))
        with httpx.Client(base_url=gateway.url) as browser:
            assert dashboard_sign_in(browser, reader).status_code == 303
            page = browser.get("/dashboard/keys")
            assert "Create key" not in page.text and "keys:write scope" in page.text
            csrf = dashboard_csrf(browser)
            minted = browser.post("/dashboard/keys", data={"csrf": csrf, "scope": "inference"})
            assert minted.status_code == 403, minted.text
            assert "keys:write" in minted.text and "cannot make or revoke keys" in minted.text
            revoked = browser.post(f"/dashboard/keys/{full_id}/revoke", data={"csrf": csrf})
            assert revoked.status_code == 403, revoked.text
        assert httpx.get(f"{gateway.url}/api/balance", headers=auth(full_key)).status_code == 200
        with tenant_factory.sessions() as session:
            assert len(tenants.keys_of(session, tenant_id)) == 2  # nothing was made

    def test_a_key_made_in_a_session_has_at_most_its_scopes(self, gateway, tenant_factory):
        tenant_id, _, _ = tenant_factory.create("pro")
        with transaction(tenant_factory.sessions) as session:
            _, manager = tenants.create_key(session, tenant_id, ("usage:read", "keys:write"))
        with httpx.Client(base_url=gateway.url) as browser:
            assert dashboard_sign_in(browser, manager).status_code == 303
            csrf = dashboard_csrf(browser)
            beyond = browser.post("/dashboard/keys", data={"csrf": csrf, "scope": "inference"})
            assert beyond.status_code == 403 and "not inference" in beyond.text
            within = browser.post("/dashboard/keys", data={"csrf": csrf, "scope": "usage:read"})
            assert within.status_code == 201, within.text
            made = re.search(r'<output id="new-key"><code>([^<]+)</code>', within.text).group(1)
        refused = httpx.post(
            f"{gateway.url}/api/chat",
            headers=auth(made),
            json={"model": LLAVA, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert refused.status_code == 403
