"""The OHIF viewer (3.13, prebuilt dist from web/vendor.json) served by the facade at /viewer/,
reading the facade's own DICOMweb proxy with the signed-in user's SMART token (ADR 0044)."""

from fhir_facade.web_viewer.router import VIEWER_CSP, VIEWER_PATH, build_viewer_router

__all__ = ["VIEWER_CSP", "VIEWER_PATH", "build_viewer_router"]
