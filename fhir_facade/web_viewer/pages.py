"""The two documents the facade writes for OHIF instead of the shipped ones (ADR 0044): index.html
without inline scripts or links to other hosts, and app-config.js pointing at /dicom-web."""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

__all__ = ["ViewerPages"]

_TEMPLATE = Path(__file__).parent / "static" / "app-config.js"


@dataclass(frozen=True)
class ViewerPages:
    """What the viewer's pages are made of, all from Settings: where OHIF is mounted (`public_path`,
    e.g. "/viewer/"), the DICOMweb root it reads (the facade's proxy), whether requests need a
    SMART token, and where a user without one signs in (the SMART app's launch page)."""

    public_path: str
    dicomweb_root: str
    auth_required: bool
    launch_url: str
    app_bundle: str
    app_css: str

    def app_config(self) -> str:
        """OHIF's window.config: one DICOMweb data source (the facade) and the token hook."""
        settings = {
            "publicPath": self.public_path,
            "dicomweb": self.dicomweb_root,
            "authRequired": self.auth_required,
            "launchUrl": self.launch_url,
            "appBundle": self.app_bundle,
        }
        return _TEMPLATE.read_text(encoding="utf-8").replace(
            "__FACADE_SETTINGS__", json.dumps(settings, indent=2)
        )

    def index_html(self) -> str:
        """The shell OHIF renders into (#root, #react-portal): the stylesheet and app-config.js, which
        adds the entry bundle once it knows a token is there (or none is needed)."""
        base = escape(self.public_path)
        return (
            '<!doctype html><html lang="en"><head><meta charset="UTF-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1,shrink-to-fit=no">'
            '<meta name="theme-color" content="#000000"><title>Viewer</title>'
            f'<link rel="icon" href="{base}assets/favicon.ico">'
            f'<link href="{base}{escape(self.app_css)}" rel="stylesheet">'
            f'<script src="{base}app-config.js"></script>'
            "</head><body><noscript>The viewer needs JavaScript.</noscript>"
            '<div id="react-portal"></div><div id="root"></div></body></html>'
        )
