"""The page of `mhr serve` in a real headless Chromium: pick a user, read the list, boost a group.

Needs Python's playwright (in the test extra) and a chromium binary: Debian's `chromium` package
(`apt-get install chromium`), or any Chromium named by $MHR_CHROMIUM. No `playwright install` and no
network: the browser is launched from its path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="mhr serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="mhr serve needs the serve extra: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install playwright")

from tests.serving import call, start_server, stop_server, tiny_run  # noqa: E402

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def chromium() -> str | None:
    named = os.environ.get("MHR_CHROMIUM")
    if named:
        return named
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def page(tmp_path_factory, one_thread):
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium found: install it with `apt-get install chromium` (Debian/Ubuntu), "
                    "or point MHR_CHROMIUM at a Chromium binary")
    ds = tiny_run(tmp_path_factory.mktemp("browser") / "ws")
    proc, url = start_server(ds, "heads")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 820})
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(url + "/")
        yield tab, url, errors
        browser.close()
    stop_server(proc)


def rendered(tab) -> list[str]:
    return tab.eval_on_selector_all("#recs tbody tr[data-item]", "rows => rows.map(r => r.dataset.item)")


def share(tab, group: str) -> float:
    return float(tab.get_attribute(f"#exposure .row[data-group='{group}']", "data-share"))


def test_pick_a_user_and_boost_a_group(page, tmp_path):
    tab, url, errors = page
    tab.wait_for_selector("#recs tbody tr[data-item]")
    tab.fill("#k", "5")
    tab.dispatch_event("#k", "change")
    tab.fill("#user", "u2")
    tab.dispatch_event("#user", "change")
    tab.wait_for_function("document.querySelector('#list-note').textContent.includes('user u2') && "
                          "document.querySelectorAll('#recs tbody tr[data-item]').length === 5")
    _, want = call(url, "/recommend?user=u2&k=5")
    assert rendered(tab) == [r["item"] for r in want["items"]]  # the page shows the API's list
    assert tab.inner_text("#recs tbody tr:first-child td:nth-child(2)") == want["items"][0]["title"]
    assert tab.locator("#profile .row").count() == 3 and tab.locator("#history-list li").count() > 0

    group = min(want["exposure"]["item"], key=want["exposure"]["item"].get)  # the least exposed group
    before = share(tab, group)
    assert before == pytest.approx(want["exposure"]["item"][group])
    tab.select_option("#steer-group", group)
    tab.eval_on_selector("#boost", "el => { el.value = '3'; el.dispatchEvent(new Event('input')); }")
    tab.wait_for_function("document.querySelector('#list-note').textContent.includes('steered')")
    tab.wait_for_selector("#recs td.new")  # an item entered the list
    after = share(tab, group)
    assert after > before
    _, boosted = call(url, f"/recommend?user=u2&k=5&boost=item:{group}=3")
    assert rendered(tab) == [r["item"] for r in boosted["items"]]
    shot = tmp_path / "serve.png"
    tab.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MHR_SCREENSHOT"):  # the README's picture: MHR_SCREENSHOT=docs/serve.png
        shutil.copy(shot, Path(os.environ["MHR_SCREENSHOT"]))
    assert not tab.is_visible("#error") and errors == []


def test_paste_a_history(page):
    tab, url, errors = page
    tab.click("#reset")
    tab.fill("#k", "5")
    tab.click("#paste summary")
    tab.fill("#history", "i3, i4  i5\ni6")
    tab.click("#go")
    tab.wait_for_function("!document.querySelector('#list-note').textContent.includes('user')")
    _, want = call(url, "/recommend", {"history": ["i3", "i4", "i5", "i6"], "k": 5})
    assert rendered(tab) == [r["item"] for r in want["items"]]
    assert tab.locator("#history-list li").count() == 4 and errors == []
