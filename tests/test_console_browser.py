"""The operator console in a real headless Chromium (Debian's chromium and chromium-driver, Selenium).

The gateway runs in process on a real redis-server; the browser's blocking calls run in a
thread so the event loop keeps serving. `make test` installs the browser when it is root and
the packages are missing (scripts/ensure-console-browser.sh); without it these tests skip and
say why. Screenshots of the main pages go to artifacts/console/ (git ignores it). axe-core
(bundled by axe-selenium-python) checks every page: no serious or critical violation.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.console.app import COOKIE
from tests.conftest import Gateway

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "console"
T = TypeVar("T")


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/lib/chromium/{name}")
                                            if os.access(p, os.X_OK)), None)  # fmt: skip
        if found:
            return found
    return None


CHROMIUM = _find("chromium", "chromium-browser")
CHROMEDRIVER = _find("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium or chromedriver is missing: install Debian's chromium and chromium-driver "
    "(make test does when root: scripts/ensure-console-browser.sh)",
)


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM and CHROMEDRIVER
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()


async def run(fn: Callable[..., T], *args: Any) -> T:
    """A blocking browser step, off the event loop that serves the gateway."""
    return await asyncio.to_thread(functools.partial(fn, *args))


def shot(d: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(SHOTS / f"{name}.png"))


def wait_for(d: WebDriver, by: str, what: str) -> Any:
    return WebDriverWait(d, 15).until(ec.presence_of_element_located((by, what)))


def click_through(d: WebDriver, by: str, what: str) -> None:
    """Click something that loads a new page, and wait until the old page is gone.

    Without the wait, a lookup right after the click can find an element of the page being
    left (the keys list shows the same link before and after a search) and then fail with a
    stale element when the new page replaces it.
    """
    old = d.find_element(By.TAG_NAME, "html")
    d.find_element(by, what).click()

    def gone(_: WebDriver) -> bool:
        try:
            old.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            # Asked mid-navigation, chromedriver can answer with an inspector error instead of
            # "stale": the node's document (or its JavaScript context) is gone, which is what this
            # waits for.
            if any(gone in (exc.msg or "") for gone in ("does not belong to the document", "Cannot find context")):
                return True
            raise
        return False

    WebDriverWait(d, 15).until(gone)


def sign_in(d: WebDriver, base: str, token: str) -> None:
    d.delete_all_cookies()
    d.get(base + "/sign-in")
    d.find_element(By.ID, "token").send_keys(token)
    click_through(d, By.ID, "sign-in")
    try:
        wait_for(d, By.ID, "q")
    except Exception:
        raise AssertionError(f"sign-in did not reach the keys page: {d.current_url}\n{d.page_source[:3000]}") from None


def axe_check(d: WebDriver) -> list[str]:
    """Serious and critical axe-core violations on the page now shown."""
    from axe_selenium_python import Axe

    axe = Axe(d)
    axe.inject()
    results = axe.run()
    assert results["passes"], "axe-core ran no rule"  # it did run on this page
    return [
        f"{d.current_url}: {v['id']} ({v['impact']}): {v['help']}: {[n['html'] for n in v['nodes']][:3]}"
        for v in results["violations"]
        if v.get("impact") in ("serious", "critical")
    ]


async def proxy_status(gw: Gateway, key: str) -> tuple[int, str | None]:
    async with await gw.call("GET", "/api/ping", key=key) as r:
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, (body.get("error") or {}).get("code")


async def test_find_disable_confirm_enable_create_in_chromium(gw: Gateway, driver: WebDriver) -> None:
    d = driver
    base = gw.admin_url
    target = await gw.create_key(name="billing-prod", owner="acme-corp")
    for i in range(5):
        await gw.create_key(name=f"other-{i}", owner=f"someone-{i}")
    assert await proxy_status(gw, target["key"]) == (200, None)

    # Sign in; find the key by its owner; open it.
    await run(sign_in, d, base, gw.tokens.developer)

    def find_and_open() -> None:
        box = d.find_element(By.ID, "q")
        box.clear()
        box.send_keys("acme-corp")
        click_through(d, By.ID, "search")
        wait_for(d, By.LINK_TEXT, "billing-prod")
        assert len(d.find_elements(By.CSS_SELECTOR, "a.key-link")) == 1
        shot(d, "keys")
        click_through(d, By.LINK_TEXT, "billing-prod")
        wait_for(d, By.ID, "key-id")
        assert d.find_element(By.ID, "key-id").text == target["id"]

    await run(find_and_open)

    # Disable -> the dialog -> a reason -> Confirm; the page shows the propagation result.
    def disable() -> dict[str, str]:
        d.find_element(By.ID, "disable").click()
        dialog = d.find_element(By.ID, "disable-dialog")
        WebDriverWait(d, 5).until(lambda _: dialog.is_displayed())
        d.find_element(By.ID, "dialog-reason").send_keys("leaked in a public repo")
        shot(d, "disable-dialog")
        click_through(d, By.ID, "dialog-confirm")
        wait_for(d, By.ID, "result")
        shot(d, "disabled")
        return {name: d.find_element(By.ID, name).text for name in ("result-action", "replicas", "confirmed", "fenced")}

    result = await run(disable)
    assert result == {"result-action": "disabled", "replicas": "1", "confirmed": "1", "fenced": "0"}
    assert await proxy_status(gw, target["key"]) == (403, "key_disabled")

    # Enable brings it back.
    def enable() -> str:
        click_through(d, By.ID, "enable")
        wait_for(d, By.ID, "result")
        return str(d.find_element(By.ID, "result-action").text)

    assert await run(enable) == "enabled"
    assert await proxy_status(gw, target["key"]) == (200, None)

    # Create: the plaintext once, with a copy button; reloading does not show it again.
    def create() -> tuple[str, str]:
        click_through(d, By.LINK_TEXT, "Create a key")
        wait_for(d, By.ID, "name").send_keys("ci-runner")
        d.find_element(By.ID, "owner").send_keys("acme-corp")
        click_through(d, By.ID, "create")
        secret = wait_for(d, By.ID, "secret").get_attribute("value")
        assert d.find_element(By.CSS_SELECTOR, "[data-copy]").is_displayed()  # the script un-hid it
        shot(d, "created")
        d.refresh()
        wait_for(d, By.ID, "gone")
        return secret, d.page_source

    secret, reloaded = await run(create)
    assert secret.startswith("gw_") and secret not in reloaded
    assert await proxy_status(gw, secret) == (200, None)

    # Sign-out ends the session on the server: the cookie it had is refused afterwards.
    def sign_out() -> str:
        cookie = d.get_cookie(COOKIE)
        assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        click_through(d, By.CSS_SELECTOR, "form.signout button")
        wait_for(d, By.ID, "token")
        return str(cookie["value"])

    old = await run(sign_out)
    digest = hashlib.sha256(old.encode()).hexdigest()
    assert await gw.replica.store.redis.exists(gw.replica.store.prefix + "console:s:" + digest) == 0
    async with aiohttp.ClientSession(cookies={COOKIE: old}) as s, s.get(base + "/keys", allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/sign-in"


async def test_a_viewer_has_no_disable_button_and_a_forged_post_is_refused(gw: Gateway, driver: WebDriver) -> None:
    d = driver
    key = await gw.create_key(name="viewer-sees", owner="acme")
    await run(sign_in, d, gw.admin_url, gw.tokens.viewer)

    def forge() -> tuple[int, int, str]:
        d.get(f"{gw.admin_url}/keys/{key['id']}")
        wait_for(d, By.ID, "key-id")
        buttons = len(d.find_elements(By.ID, "disable")) + len(d.find_elements(By.ID, "revoke"))
        # The page's own CSRF token (the sign-out form's) and the session cookie, in a POST the
        # page would never offer a viewer.
        status = d.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            const body = new URLSearchParams({csrf: document.querySelector('input[name=csrf]').value, reason: 'x'});
            fetch(arguments[0], {method: 'POST', body: body, credentials: 'same-origin'})
              .then(r => r.text().then(t => done([r.status, t])));
            """,
            f"/keys/{key['id']}/disable",
        )
        return buttons, status[0], status[1]

    buttons, status, page = await run(forge)
    assert buttons == 0
    assert status == 403 and "insufficient_permissions" in page
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True


async def test_a_cross_site_form_post_without_the_csrf_token_is_refused(gw: Gateway, driver: WebDriver) -> None:
    d = driver
    key = await gw.create_key(name="csrf-target", owner="acme")

    async def attacker_page(request: web.Request) -> web.Response:
        html = (
            f'<!doctype html><html lang="en"><title>win a prize</title><form method="post" '
            f'action="{gw.admin_url}/keys/{key["id"]}/disable"><input name="reason" value="csrf">'
            '<button id="go">Claim</button></form></html>'
        )
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", attacker_page)
    attacker = TestServer(app, host="127.0.0.1")  # another origin (port); same site, so the cookie goes along
    await attacker.start_server()
    try:
        await run(sign_in, d, gw.admin_url, gw.tokens.admin)

        def attack() -> str:
            d.get(str(attacker.make_url("/")))
            click_through(d, By.ID, "go")
            return str(wait_for(d, By.ID, "error-code").text)

        assert await run(attack) == "csrf_rejected"
    finally:
        await attacker.close()
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True


async def test_every_page_has_no_serious_accessibility_violation(gw: Gateway, driver: WebDriver) -> None:
    d = driver
    key = await gw.create_key(name="a11y", owner="acme", scopes=["billing:read"])
    disabled = await gw.create_key(name="a11y-disabled", owner="acme")
    async with await gw.admin_call("POST", f"/v1/keys/{disabled['id']}/disable", json={"reason": "test"}) as r:
        assert r.status == 200

    def visit_all() -> list[str]:
        problems: list[str] = []
        d.delete_all_cookies()
        d.get(gw.admin_url + "/sign-in")
        problems += axe_check(d)
        d.find_element(By.ID, "token").send_keys("gwadm_wrong_" + "x" * 20)
        click_through(d, By.ID, "sign-in")
        wait_for(d, By.ID, "token")
        problems += axe_check(d)  # the sign-in page with its error
        sign_in(d, gw.admin_url, gw.tokens.admin)
        pages = ["/keys", "/keys?q=acme&state=active", "/keys?q=nothing-matches", f"/keys/{key['id']}",
                 f"/keys/{disabled['id']}", f"/keys/{key['id']}/disable", f"/keys/{key['id']}/revoke",
                 f"/keys/{key['id']}/rotate", f"/keys/{key['id']}/limits", "/keys/new", "/audit",
                 f"/audit?key_id={key['id']}", "/status",
                 "/keys/key_00000000000000000000"]  # fmt: skip
        for path in pages:
            d.get(gw.admin_url + path)
            wait_for(d, By.ID, "main")
            problems += axe_check(d)
            names = {"/status": "status", f"/keys/{disabled['id']}": "key-disabled", "/audit": "audit"}
            if path in names:
                shot(d, names[path])
        # The shown-once page, and the dialog open.
        d.get(gw.admin_url + "/keys/new")
        d.find_element(By.ID, "name").send_keys("a11y-new")
        click_through(d, By.ID, "create")
        wait_for(d, By.ID, "secret")
        problems += axe_check(d)
        d.get(gw.admin_url + f"/keys/{key['id']}")
        d.find_element(By.ID, "disable").click()
        problems += axe_check(d)
        return problems

    problems = await run(visit_all)
    assert problems == [], "\n".join(problems)
