"""The login cookie in a real browser: Chromium stores it SameSite=Lax (Gradio asks for None,
which would let any other site's request carry it), and the page works through it."""
from playwright.sync_api import expect

from .app_server import AppServer
from .conftest import LOADED, _chromium_or_skip

USER, PASSWORD, KEY = "ann", "pa55-word-long", "key-0123456789abcdef"


def test_chromium_keeps_the_login_cookie_same_site_lax(browser):
    _chromium_or_skip()
    server = AppServer("--auth", f"{USER}:{PASSWORD}", "--require-api-key", KEY)
    try:
        context = browser.new_context(locale="en-US")
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.goto(server.url)
        page.locator("input[type=password]").wait_for()
        page.locator("input:not([type=password])").first.fill(USER)
        page.locator("input[type=password]").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector(LOADED)
        cookies = [cookie for cookie in context.cookies() if cookie["name"].startswith("access-token")]
        assert cookies and all(cookie["sameSite"] == "Lax" for cookie in cookies), cookies
        expect(page.locator("#send")).to_be_visible()
        context.close()
    finally:
        server.stop()
