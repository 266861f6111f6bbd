"""The documentation site: it builds in Sphinx's strict mode (a warning, a broken link or an
unresolved reference fails), a real headless Chromium renders its front page and the DeepSpeed
guide and reaches the DeepSpeed example, the ZeRO-3 guide and the knob reference from the front
page by clicking, and what the pages quote from the code is still there.

Screenshots of the rendered pages go to ``$TRILEMMA_ARTIFACTS`` (``.ci/run`` sets
``.ci/artifacts``), else to the test's temporary directory.
"""
import functools
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = tmp_path_factory.mktemp("html")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
                           "-d", str(out / ".doctrees"), str(DOCS), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    warnings = [line for line in proc.stderr.splitlines() if re.search(r"(WARNING|ERROR|CRITICAL):", line)
                and "real_accelerator.py" not in line]   # DeepSpeed's own log line on import, not Sphinx's
    assert proc.returncode == 0 and not warnings, "\n".join(warnings) or proc.stderr[-5000:]
    return out


def test_site_builds_strict_with_every_page(site):
    for page in ["index", "getting-started", "guides/deepspeed", "guides/megatron", "guides/huggingface",
                 "guides/operations", "guides/memory", "guides/expert-parallelism", "method", "reference/config",
                 "reference/api", "reference/trainer", "troubleshooting", "results", "RESULTS", "BENCHMARKS"]:
        assert (site / f"{page}.html").is_file(), page
    deepspeed = (site / "guides" / "deepspeed.html").read_text()
    assert "attach_engine(engine)" in deepspeed and 'id="zero-3-and-zero-infinity"' in deepspeed
    trainer = (site / "reference" / "trainer.html").read_text()
    assert "--burn-in-form" in trainer and "--deepspeed_config" in trainer   # read from the parser


def test_troubleshooting_quotes_messages_the_code_still_raises():
    page = (DOCS / "troubleshooting.md").read_text()
    quoted = re.findall(r"\*\*Message\*\*( \(from DeepSpeed\))?: `([^`]+)`", page)
    assert len(quoted) >= 20
    ours = "".join(p.read_text() for p in [*(ROOT / "trilemma_moe").rglob("*.py"), *(ROOT / "launch").iterdir()])
    import deepspeed
    theirs = "".join(p.read_text() for p in pathlib.Path(deepspeed.__file__).parent.rglob("*.py"))
    # a message split over f-string pieces is searched with the pieces' seams removed
    joined = re.sub(r'"\s*\n\s*f?"', "", ours)
    for from_deepspeed, message in quoted:
        where = theirs if from_deepspeed else joined
        assert message in where, f"troubleshooting.md quotes {message!r}, which the code no longer says"


def test_readme_is_a_front_door():
    """At most 200 lines, and every link into docs/ lands: the page exists and the anchor is one of
    its headings (the slugs GitHub and MyST both give)."""
    from myst_parser.mdit_to_docutils.base import default_slugify
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[^)#]+)(?:#([^)]+))?\)", readme)
    assert len(links) >= 10
    for page, anchor in links:
        assert (ROOT / page).exists(), page
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / page).read_text(), re.M)
            assert anchor in {default_slugify(h) for h in headings}, f"{page}#{anchor}"


def test_the_test_command_is_what_ci_runs():
    command = re.compile(r"^pip install torch==\S+ -e '\.\[[a-z,]+\]' && python -m pytest -q tests$", re.M)
    ci = command.findall((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 1
    for page in [ROOT / "README.md", DOCS / "getting-started.md"]:
        assert command.findall(page.read_text()) == ci, page.name
    apt = re.search(r'APT_PACKAGES="([^"]+)"', (ROOT / ".ci" / "run").read_text()).group(1)
    assert f"apt-get install {apt}" in (DOCS / "getting-started.md").read_text().replace("\n", " ")


def test_no_page_sends_the_reader_to_an_issue_tracker_they_do_not_have():
    pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
    for page in pages:
        hits = re.findall(r"\bissues? \d+\b", page.read_text(), re.I)
        assert not hits, f"{page.relative_to(ROOT)} refers to {hits}: say what changed instead"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags of a root CI machine with a closed network: no sandbox, no GPU, no background traffic.
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,1000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = pathlib.Path(os.environ.get("TRILEMMA_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def rendered(driver, artifacts, name):
    """Checks that the page is styled and painted, not raw HTML: the theme's stylesheet applied (the
    sidebar is laid out beside the content), no console errors, a screenshot with real content."""
    from selenium.webdriver.common.by import By
    sidebar = driver.find_element(By.CSS_SELECTOR, ".sidebar-drawer")
    content = driver.find_element(By.CSS_SELECTOR, "article")
    assert sidebar.is_displayed() and sidebar.size["width"] > 150
    assert content.location["x"] >= sidebar.location["x"] + sidebar.size["width"] - 1
    # (the browser asks every server for /favicon.ico; the site has none)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
    assert not errors, errors
    png = artifacts / f"{name}.png"
    assert driver.save_screenshot(str(png))
    from PIL import Image
    colours = Image.open(png).convert("L").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, f"{png} is nearly blank"
    return content.text


def test_front_page_and_deepspeed_guide_render(browser, served, artifacts):
    from selenium.webdriver.common.by import By
    browser.get(served + "/index.html")
    text = rendered(browser, artifacts, "front_page")
    assert "Where to go" in text and "DeepSpeed guide" in text
    browser.find_element(By.LINK_TEXT, "DeepSpeed guide").click()   # one click
    assert browser.current_url.split("#")[0].endswith("/guides/deepspeed.html")
    text = rendered(browser, artifacts, "deepspeed_guide")
    code = browser.find_element(By.CSS_SELECTOR, "#a-model-with-our-layer-trained-by-deepspeed div.highlight")
    assert code.is_displayed() and "attach_engine(engine)" in code.text and "deepspeed.initialize" in code.text
    assert code.find_elements(By.CSS_SELECTOR, "span.kn")   # syntax-highlighted, not a bare <pre>


@pytest.mark.parametrize("link,page,heading", [
    ("ZeRO-3 and ZeRO-Infinity", "/guides/deepspeed.html", "ZeRO-3 and ZeRO-Infinity"),
    ("Configuration reference", "/reference/config.html", "num_experts"),
])
def test_front_page_reaches_in_one_click(browser, served, link, page, heading):
    from selenium.webdriver.common.by import By
    browser.get(served + "/index.html")
    browser.find_element(By.LINK_TEXT, link).click()
    assert browser.current_url.split("#")[0].endswith(page)
    assert heading in browser.find_element(By.CSS_SELECTOR, "article").text
