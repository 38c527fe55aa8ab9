"""/docs works without internet (issue 12, ADR 0021): the page references only the facade's own
assets, under a Content-Security-Policy that allows nothing else, and a real browser (Debian's
chromium, driven by Selenium through Debian's chromedriver) renders the operations from them."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_facade.api_docs import DOCS_CSP
from fhir_facade.app import create_app
from fhir_facade.config import Settings
from tests.conftest import LiveServer, serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/docs.png")

_CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    data = tmp_path_factory.mktemp("docs")
    return create_app(
        Settings(
            base_url="http://testserver/fhir",
            data_dir=data,
            database_url=f"sqlite:///{data}/store.sqlite3",
            watch_studies=False,
            analyze_enabled=False,
        )
    )


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def _references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_the_page_references_only_the_facades_own_assets(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == DOCS_CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.text
    assert not re.search(r"https?://", html), "the page names an external URL"
    assert "<script>" not in html and "<style" not in html and " style=" not in html  # CSP: 'self' only
    assets = _references(html)
    assert {Path(a).name for a in assets} == {
        "favicon.png",
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-initializer.js",
    }
    for asset in assets:
        assert asset.startswith("/docs/static/"), asset
        answer = client.get(asset)
        assert answer.status_code == 200, asset
        assert _CONTENT_TYPES[Path(asset).suffix] in answer.headers["content-type"], asset
        assert len(answer.content) > 100, asset
    # The document the page loads is the one the initializer reads from the page.
    assert 'data-openapi-url="/openapi.json"' in html
    assert client.get("/openapi.json").json()["info"]["title"] == "fhir-facade"


def test_the_csp_allows_only_the_facade_for_scripts_and_styles() -> None:
    directives = dict(d.strip().split(" ", 1) for d in DOCS_CSP.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"


def test_no_cdn_page_is_left(client: TestClient) -> None:
    assert client.get("/redoc").status_code == 404
    assert client.get("/docs/oauth2-redirect").status_code == 404


def test_the_page_follows_the_root_path(app: FastAPI) -> None:
    """Behind a reverse proxy under a path prefix (ASGI root_path) the links carry the prefix."""
    with TestClient(app, root_path="/pacs-gateway") as prefixed:
        html = prefixed.get("/docs").text
    assert all(ref.startswith("/pacs-gateway/docs/static/") for ref in _references(html))
    assert 'data-openapi-url="/pacs-gateway/openapi.json"' in html


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    # No PACS call is made: the page and the document need none.
    with serve({"dicomweb_url": "http://127.0.0.1:9/dicom-web"}) as server:
        yield server


def test_a_browser_renders_the_operations_offline(live: LiveServer) -> None:
    """Headless chromium loads /docs from the facade alone: anything the page tried to fetch
    elsewhere would be refused by the CSP and logged, and there is no network to fetch it from."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists() and shutil.which("chromium")):
        reason = f"{CHROMIUM} or {CHROMEDRIVER} is missing: run scripts/setup.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # never Selenium Manager's download
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    root = live.base_url.removesuffix("/fhir")
    try:
        driver.get(f"{root}/docs")
        WebDriverWait(driver, 60).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".opblock"))
        )
        assert "fhir-facade" in driver.find_element(By.CSS_SELECTOR, ".info .title").text
        paths = {
            e.get_attribute("data-path")
            for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        }
        assert {"/fhir/ImagingStudy", "/fhir/ImagingStudy/{resource_id}", "/dicom-web/studies"} <= paths
        search = driver.find_elements(
            By.CSS_SELECTOR, '.opblock-get .opblock-summary-path[data-path="/fhir/ImagingStudy"]'
        )
        assert search, "GET /fhir/ImagingStudy (search) is not listed"
        driver.save_screenshot(str(SCREENSHOT))
        refused = [
            entry["message"]
            for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]
        ]
        assert refused == [], refused
    finally:
        driver.quit()
    assert httpx.get(f"{root}/docs/static/swagger-ui-bundle.js").status_code == 200
