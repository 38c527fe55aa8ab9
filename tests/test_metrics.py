"""`GET /metrics` read back with prometheus-client's own parser: names, types, HELP texts and
values as Prometheus will see them (prometheus.io/docs/instrumenting/exposition_formats)."""

from __future__ import annotations

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import LiveServer, serve


def scrape(server: LiveServer) -> tuple[httpx.Response, dict[str, Metric]]:
    response = httpx.get(server.base_url.removesuffix("/fhir") + "/metrics", timeout=30)
    assert response.status_code == 200
    return response, {family.name: family for family in text_string_to_metric_families(response.text)}


def test_the_exposition_parses_with_names_types_and_help(facade: LiveServer) -> None:
    httpx.get(f"{facade.base_url}/ImagingStudy", timeout=30)  # at least one QIDO-RS request
    response, families = scrape(facade)
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert set(families) == {"fhir_facade_qido_requests", "fhir_facade_orthanc_requests"}
    qido = families["fhir_facade_qido_requests"]
    assert (qido.type, qido.documentation) == ("counter", "QIDO-RS requests sent to the PACS.")
    assert [sample.name for sample in qido.samples] == ["fhir_facade_qido_requests_total"]
    assert qido.samples[0].value >= 1
    orthanc = families["fhir_facade_orthanc_requests"]
    assert (orthanc.type, orthanc.documentation) == ("counter", "Orthanc REST requests (e.g. counting).")


def test_values_are_read_at_scrape_time(facade: LiveServer) -> None:
    _, before = scrape(facade)
    httpx.get(f"{facade.base_url}/ImagingStudy", timeout=30)
    _, after = scrape(facade)
    assert (
        after["fhir_facade_qido_requests"].samples[0].value
        > before["fhir_facade_qido_requests"].samples[0].value
    )


def test_every_app_has_its_own_registry(facade: LiveServer, loaded_orthanc: EmbeddedOrthanc) -> None:
    """A second application in the same process exposes its own counts (the global registry
    would refuse the second collector)."""
    with serve({"dicomweb_url": loaded_orthanc.dicomweb_url}) as other:
        _, families = scrape(other)
        assert set(families) == {"fhir_facade_qido_requests"}  # no orthanc_url: no Orthanc counter
        assert families["fhir_facade_qido_requests"].samples[0].value == 0
    assert facade.app.state.metrics_registry is not other.app.state.metrics_registry
