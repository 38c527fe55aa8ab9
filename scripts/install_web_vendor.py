#!/usr/bin/env python3
"""Install the pinned browser packages of web/vendor.json into .web-vendor/ (ADR 0043).

Why not `npm ci`: the facade serves prebuilt files (OHIF's dist/, fhirclient's browser build), so
the packages' dependency trees (hundreds of MB for @ohif/app) are never needed. `npm pack` fetches
one tarball through the registry client as configured here; the tarball's sha512 must equal the
pinned integrity before anything is extracted, and only the listed files are kept.

    python3 scripts/install_web_vendor.py run    the packages the running facade serves
    python3 scripts/install_web_vendor.py test   those and the test-only ones (axe-core)

Idempotent: a package whose .web-vendor/<dir>/.integrity already holds the pinned value is skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "web" / "vendor.json"
VENDOR_DIR = ROOT / ".web-vendor"
STAMP = ".integrity"


def sha512_integrity(path: Path) -> str:
    """The Subresource-Integrity form npm uses: ``sha512-<base64 digest>``."""
    digest = hashlib.sha512()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def wanted(member: str, files: list[str]) -> str | None:
    """The path under the package's folder for a tarball member, or None if it is not listed."""
    if not member.startswith("package/"):
        return None
    relative = member[len("package/") :]
    for entry in files:
        if relative == entry or (entry.endswith("/") and relative.startswith(entry)):
            return relative
    return None


def install(package: dict[str, object]) -> None:
    name, version = str(package["name"]), str(package["version"])
    integrity = str(package["integrity"])
    files = [str(f) for f in package["files"]]  # type: ignore[attr-defined]
    target = VENDOR_DIR / str(package["dir"])
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == integrity:
        return
    print(f"install_web_vendor: fetching {name}@{version}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            ["npm", "pack", f"{name}@{version}", "--silent", "--pack-destination", scratch],
            check=True,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        (tarball,) = Path(scratch).glob("*.tgz")
        found = sha512_integrity(tarball)
        if found != integrity:
            raise SystemExit(f"{name}@{version}: integrity {found} is not the pinned {integrity}")
        staging = Path(scratch) / "out"
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                relative = wanted(member.name, files)
                if relative is None or not member.isfile():
                    continue
                member.name = relative
                archive.extract(member, staging, filter="data")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, target)
    stamp.write_text(integrity + "\n")


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "test"
    if mode not in {"run", "test"}:
        print(f"usage: {argv[0]} [run|test]", file=sys.stderr)
        return 2
    manifest = json.loads(MANIFEST.read_text())
    for package in manifest["packages"]:
        if package["for"] == "run" or mode == "test":
            install(package)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
