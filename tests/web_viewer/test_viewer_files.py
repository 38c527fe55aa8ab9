"""What /viewer/ answers, without a browser (ADR 0044): the facade's own index.html and
app-config.js (the facade's /dicom-web only, no other host, no inline script), OHIF's dist files
with the types browsers insist on and cache headers by hashed name, the public path rebased under
/viewer/, OHIF's client-side routes falling back to index.html, and nothing outside the dist."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fhir_facade.app import create_app
from fhir_facade.config import Settings
from fhir_facade.web_viewer import VIEWER_CSP
from fhir_facade.web_viewer.dist import ViewerDist, content_type, is_hashed
from fhir_facade.web_viewer.router import default_dist_dir

DIST = default_dist_dir()

pytestmark = pytest.mark.skipif(
    not (DIST / "index.html").is_file(), reason=f"{DIST} missing: run scripts/setup.sh (web/vendor.json)"
)


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "base_url": "https://pacs.hospital.example/fhir",
        "data_dir": tmp_path,
        "database_url": f"sqlite:///{tmp_path}/store.sqlite3",
        "watch_studies": False,
        "analyze_enabled": False,
        "dicomweb_url": "http://127.0.0.1:9/dicom-web",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = _settings(tmp_path_factory.mktemp("viewer"), auth="smart")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _app_bundle() -> str:
    match = re.search(r'src="/(app\.bundle\.[0-9a-f]+\.js)"', (DIST / "index.html").read_text())
    assert match
    return match.group(1)


def test_index_html_is_the_facades_own(client: TestClient) -> None:
    for path in ("/viewer/", "/viewer/index.html"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["content-security-policy"] == VIEWER_CSP
        assert response.headers["cache-control"] == "no-cache"
        html = response.text
        assert "<script>" not in html, "an inline script (the CSP refuses it)"
        assert not re.search(r"https?://", html), "the page names another host"
        assert re.findall(r'(?:src|href)="([^"]+)"', html) == [
            "/viewer/assets/favicon.ico",
            "/viewer/app.bundle.css",
            "/viewer/app-config.js",
        ]
    assert client.get("/viewer", follow_redirects=False).headers["location"] == "/viewer/"


def test_app_config_reads_only_the_facades_dicomweb(client: TestClient) -> None:
    response = client.get("/viewer/app-config.js")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    script = response.text
    assert re.findall(r"https?://[^\s\"']+", script) == ["https://pacs.hospital.example/dicom-web"]
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert f"{root}: facade.dicomweb" in script
    assert '"authRequired": true' in script and '"launchUrl": "/app/launch.html"' in script
    assert f'"appBundle": "{_app_bundle()}"' in script
    # The token comes from fhirclient's sessionStorage entry, through OHIF's auth service.
    assert "sessionStorage.getItem('SMART_KEY')" in script and "tokenResponse.access_token" in script
    assert "userAuthenticationService.setServiceImplementation" in script
    assert "cloudfront" not in script and "googleapis" not in script


def test_the_csp_allows_no_other_host() -> None:
    directives = dict(d.strip().split(" ", 1) for d in VIEWER_CSP.split(";"))
    assert directives["default-src"] == "'none'"
    # no 'unsafe-inline'; 'unsafe-eval' for OHIF's SEG loader (ndarray's new Function, ADR 0044)
    assert directives["script-src"] == "'self' 'unsafe-eval' 'wasm-unsafe-eval'"
    assert directives["connect-src"] == "'self' data: blob:"
    for sources in directives.values():
        assert "http" not in sources and "*" not in sources, sources


def test_the_entry_bundle_is_rebased_under_viewer(client: TestClient) -> None:
    response = client.get(f"/viewer/{_app_bundle()}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert b'__webpack_require__.p = "/viewer/";' in response.content
    assert b'__webpack_require__.p = "/";' not in response.content
    assert int(response.headers["content-length"]) == len(response.content)


def test_stylesheet_fonts_load_from_viewer(client: TestClient) -> None:
    css = client.get("/viewer/app.bundle.css")
    assert css.status_code == 200 and css.headers["content-type"] == "text/css; charset=utf-8"
    fonts = re.findall(r"url\(([^)]+\.woff2)\)", css.text)
    assert fonts and all(f.startswith("/viewer/") for f in fonts)
    font = client.get(fonts[0])
    assert font.status_code == 200 and font.headers["content-type"] == "font/woff2"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (next(DIST.glob("*.wasm")).name if DIST.is_dir() else "x.wasm", "application/wasm"),
        ("ort/esm/ort.all.min.js", "text/javascript; charset=utf-8"),
        ("assets/favicon.ico", "image/x-icon"),
        ("manifest.json", "application/json"),
    ],
)
def test_dist_files_have_the_types_browsers_insist_on(client: TestClient, name: str, expected: str) -> None:
    response = client.get(f"/viewer/{name}")
    assert response.status_code == 200, name
    assert response.headers["content-type"] == expected
    assert response.content == (DIST / name).read_bytes()


def test_worker_and_mjs_types() -> None:
    assert content_type("histogram-worker.bundle.ec5f0cf05ce3909c.js").startswith("text/javascript")
    assert content_type("ort/ort-wasm-simd-threaded.mjs").startswith("text/javascript")
    assert is_hashed("0ddf166f7a343eda.wasm") and is_hashed("app.bundle.0f6159c501addfe9.js")
    assert not is_hashed("app.bundle.css") and not is_hashed("es6-shim.min.js")


def test_client_side_routes_get_index_html(client: TestClient) -> None:
    index = client.get("/viewer/").text
    for route in ("/viewer/viewer", "/viewer/viewer/dicomweb", "/viewer/segmentation"):
        response = client.get(route, params={"StudyInstanceUIDs": "1.2.3"})
        assert response.status_code == 200 and response.text == index, route


def test_missing_assets_and_paths_outside_the_dist_are_404(client: TestClient) -> None:
    for path in (
        "/viewer/9999.bundle.0000000000000000.js",
        "/viewer/sw.js",  # OHIF's service worker is not served (it would load Workbox from Google)
        "/viewer/init-service-worker.js",
        "/viewer/google.js",
        "/viewer/%2e%2e/%2e%2e/pyproject.toml",
        "/viewer/..%2f..%2fpyproject.toml",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "<html" not in response.text.lower(), path


def test_dist_refuses_traversal_directly() -> None:
    dist = ViewerDist(DIST, "/viewer/")
    assert dist.find("../LICENSE") is None
    assert dist.find("/etc/passwd") is None
    assert dist.find("assets/../../LICENSE") is None
    assert dist.find("manifest.json") is not None
    with pytest.raises(ValueError, match="public_path"):
        ViewerDist(DIST, "/viewer")


def test_a_path_prefix_of_the_base_url_moves_the_viewer(tmp_path: Path) -> None:
    settings = _settings(tmp_path, base_url="https://host.example/pacs-gateway/fhir")
    with TestClient(create_app(settings)) as prefixed:
        html = prefixed.get("/viewer/").text
        script = prefixed.get("/viewer/app-config.js").text
        bundle = prefixed.get(f"/viewer/{_app_bundle()}").content
    assert '"/pacs-gateway/viewer/app-config.js"' in html
    assert '"publicPath": "/pacs-gateway/viewer/"' in script
    assert '"dicomweb": "https://host.example/pacs-gateway/dicom-web"' in script
    assert '"authRequired": false' in script
    assert b'__webpack_require__.p = "/pacs-gateway/viewer/";' in bundle


def test_the_viewer_can_be_switched_off(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path, viewer_enabled=False))) as off:
        assert off.get("/viewer/").status_code == 404


def test_without_a_dist_the_viewer_says_how_to_install_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path, viewer_dist_dir=tmp_path / "nowhere")
    with TestClient(create_app(settings)) as missing:
        response = missing.get("/viewer/viewer")
    assert response.status_code == 404
    assert "scripts/setup.sh" in response.text
