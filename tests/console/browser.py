"""Drives the ops console in a real browser (Debian's chromium through
chromedriver, with selenium), as tests/console.rs asks:

    browser.py BASE TOKEN STORAGE BIG_STORAGE BAD_RUN BAD_KEY FILES OUT_DIR AXE_JS SCHEDULED

logs in with TOKEN, starts a sync of STORAGE from the storages page and
watches its counters reach FILES without the page reloading, opens BAD_RUN
and finds BAD_KEY among its failed objects, retries them (a new run that
fails on it again), pauses SCHEDULED's periodic syncs, starts a sync of BIG_STORAGE (synced
once before, when it held 3,000 objects), sees its rate and an ETA
estimated from that sync, and cancels it with the run page's button (accepting the confirmation), and runs
axe-core on every page: no serious or critical violation. Then the main
pages again at a phone's width (390 px: nothing wider than the screen) and
in dark mode (a dark background; axe again, contrast included). Screenshots of
every page go to OUT_DIR (`overview_after.png`, the overview once the
syncs are done, is the one docs/console.png shows). Prints one JSON line; exits non-zero on failure.
"""

import json
import re
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

BASE, TOKEN, STORAGE, BIG, BAD_RUN, BAD_KEY, FILES, OUT, AXE, SCHEDULED = sys.argv[1:11]


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"]:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


driver = browser()
wait = WebDriverWait(driver, 90)
axe_source = open(AXE, encoding="utf-8").read()
report = {"pages": {}, "step": None}


def step(name):
    report["step"] = name


def check_page(name):
    """Screenshot, then axe-core: serious and critical violations fail."""
    driver.save_screenshot(f"{OUT}/{name}.png")
    driver.execute_script(axe_source)
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document).then(r => done(r.violations.map("
        "v => ({id: v.id, impact: v.impact, nodes: v.nodes.length}))));"
    )
    report["pages"][name] = found
    serious = [v for v in found if v["impact"] in ("serious", "critical")]
    assert not serious, f"{name}: accessibility violations {serious}"


# The pages checked again at a phone's width and in dark mode.
PAGES = [
    ("overview", "/ui/"),
    ("runs", "/ui/runs"),
    ("run_with_errors", f"/ui/runs/{BAD_RUN}"),
    ("storages", "/ui/storages"),
    ("storage", f"/ui/storages/{STORAGE}"),
]

# Relative luminance (0 black .. 1 white) of the page's background.
LUMINANCE = """
const c = getComputedStyle(document.body).backgroundColor.match(/[0-9.]+/g).map(Number);
const l = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
return 0.2126 * l(c[0]) + 0.7152 * l(c[1]) + 0.0722 * l(c[2]);
"""


def status_text():
    return driver.find_element(By.CSS_SELECTOR, "[data-status]").text


def lost_node(err):
    """chromedriver lost an element it had just found (once, on the login
    form right after axe ran: "Node with given id does not belong to the
    document")."""
    return isinstance(err, StaleElementReferenceException) or (
        "does not belong to the document" in str(err))


def log_in():
    """Fills in the token and submits, finding the form's fields again when
    chromedriver loses them (at most 5 tries; done once the page left the
    login form). A lost node can stay lost until the page is loaded again
    (seen with chromedriver 156.0.8078.114 three times in a row), so each
    retry reloads the login page first."""
    for attempt in range(5):
        if "/ui/login" not in driver.current_url:
            return
        try:
            field = wait.until(ec.element_to_be_clickable((By.ID, "token")))
            field.clear()
            field.send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
            return
        except WebDriverException as err:
            if attempt == 4 or not lost_node(err):
                raise
            time.sleep(0.5)
            driver.refresh()


def open_storages_and_sync(storage):
    driver.get(f"{BASE}/ui/storages")
    button = wait.until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, f'button[data-action="/api/v1/storages/{storage}/sync"]')))
    button.click()
    wait.until(ec.url_contains("/ui/runs/"))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-status]")))


try:
    step("log in")
    driver.get(f"{BASE}/ui/")
    wait.until(ec.url_contains("/ui/login"))
    check_page("login")
    log_in()
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Overview"))
    check_page("overview")

    step("sync and watch")
    driver.get(f"{BASE}/ui/storages")
    check_page("storages")
    open_storages_and_sync(STORAGE)
    driver.execute_script("window.__stayed = 'yes';")
    wait.until(lambda d: status_text() == "completed")
    created = driver.find_element(By.CSS_SELECTOR, '[data-counter="created"]').text
    assert created == FILES, f"created {created}, expected {FILES}"
    assert driver.execute_script("return window.__stayed;") == "yes", "the page reloaded"
    check_page("run")
    driver.get(f"{BASE}/ui/storages/{STORAGE}")
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), f"Storage {STORAGE}"))
    check_page("storage")

    step("failed objects")
    driver.get(f"{BASE}/ui/runs/{BAD_RUN}")
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "main"), BAD_KEY))
    check_page("run_with_errors")

    step("retry failed objects")
    driver.find_element(By.CSS_SELECTOR, "button[data-action$='/retry']").click()
    wait.until(lambda d: d.current_url.rstrip("/").split("/")[-1] not in (BAD_RUN, ""))
    wait.until(lambda d: status_text() not in ("queued", "running"))
    assert status_text() == "completed_with_errors", status_text()

    step("pause a schedule")
    driver.get(f"{BASE}/ui/storages")
    pause = f'button[data-action="/api/v1/storages/{SCHEDULED}/pause"]'
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, pause))).click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'button[data-action="/api/v1/storages/{SCHEDULED}/resume"]')))

    step("rate and ETA")
    open_storages_and_sync(BIG)
    wait.until(lambda d: "per second" in d.find_element(By.CSS_SELECTOR, "[data-rate]").text)
    # A run started with no object counted yet shows a rate of 0.0 and an
    # ETA of "not started": wait for its first counters.
    wait.until(lambda d: not d.find_element(By.CSS_SELECTOR, "[data-eta]").text.startswith("not started"))
    eta = driver.find_element(By.CSS_SELECTOR, "[data-eta]").text
    assert re.match(r"(about \d+ s \(of 3000 objects listed\)|past the 3000 )", eta), eta

    step("cancel")
    cancel = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button.danger[data-action$='/cancel']")))
    cancel.click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-status]").text == "cancelled")

    step("runs page")
    driver.get(f"{BASE}/ui/runs")
    check_page("runs")
    driver.get(f"{BASE}/ui/")
    check_page("overview_after")

    step("phone width")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    for name, path in PAGES:
        driver.get(f"{BASE}{path}")
        wide = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth];")
        assert wide[0] <= wide[1] + 1, f"{name}: {wide[0]} px wide on a {wide[1]} px phone"
        check_page(f"{name}_phone")
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    step("dark mode")
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    for name, path in PAGES:
        driver.get(f"{BASE}{path}")
        lum = driver.execute_script(LUMINANCE)
        assert lum < 0.2, f"{name}: background luminance {lum} in dark mode"
        check_page(f"{name}_dark")
    report["step"] = "done"
    print(json.dumps(report))
except Exception as err:  # noqa: BLE001 - the report says where it stopped
    driver.save_screenshot(f"{OUT}/failure.png")
    report["error"] = f"{type(err).__name__}: {err}"
    print(json.dumps(report))
    sys.exit(1)
finally:
    driver.quit()
