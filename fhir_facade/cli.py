"""`fhir-facade` command line: `serve` runs the FHIR server against a configured PACS;
`embedded` also starts a local Orthanc with the demo brain MRI study (the README's run command);
`sync` runs only the upstream sync worker; `register-backend-client` and `set-password` edit the
built-in authorization server's registry (read at start-up: restart the server after either)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from fhir_facade.app import create_app
from fhir_facade.config import Settings
from fhir_facade.correlation import CorrelationIdFilter
from fhir_facade.http_limits import uvicorn_options

__all__ = ["main"]

log = logging.getLogger("fhir_facade")


def check_listen_address(settings: Settings, host: str) -> None:
    """Refuse a non-loopback address while requests are unauthenticated (FACADE_AUTH=none), unless
    the operator said so (FACADE_ALLOW_UNAUTHENTICATED_REMOTE): patient data must not be one typo
    away from the network. With FACADE_AUTH=smart every request needs a token, so any address is
    fine."""
    if settings.auth == "smart":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not settings.allow_unauthenticated_remote:
        raise SystemExit(
            f"fhir-facade: refusing to listen on {host}: requests are not authenticated "
            "(FACADE_AUTH=none). Set FACADE_AUTH=smart, listen on 127.0.0.1 behind an authenticating "
            "proxy, or set FACADE_ALLOW_UNAUTHENTICATED_REMOTE=true if the network in front of it is "
            "trusted."
        )


def _serve(settings: Settings, host: str, port: int) -> None:
    check_listen_address(settings, host)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        **uvicorn_options(settings),
    )


def demo_analysis_notice(
    settings: Settings, study_uid: str, *, stable_age: int, stored_before: bool = False
) -> str:
    """What happens to the demo study after start-up, in one log line: analysed through its arrival
    Task (the watcher and the analysis worklist, ADR 0005/0006) when it has just been stored and
    no setting turns that off; a study already in the PACS does not arrive again."""
    if stored_before:
        return (
            f"demo: study {study_uid} was stored at an earlier start, so it does not arrive again and "
            f"is not analysed now (its earlier analysis: GET {settings.base_url}/Task?code=analyze"
            f"&focus=ImagingStudy/{study_uid}); POST {settings.base_url}/ImagingStudy/{study_uid}/$analyze "
            "analyses it again"
        )
    reasons = [
        reason
        for off, reason in (
            (not settings.demo_analyze, "FACADE_DEMO_ANALYZE=false"),
            (not settings.watch_studies, "FACADE_WATCH_STUDIES=false"),
            (not settings.analyze.enabled, "FACADE_ANALYZE_ENABLED=false"),
            (not settings.analyze.worklist, "FACADE_ANALYZE_WORKLIST=false"),
            ("MR" not in settings.task_modalities, "FACADE_TASK_MODALITIES has no MR"),
        )
        if off
    ]
    if reasons:
        return (
            f"demo: study {study_uid} is not analysed at start-up ({', '.join(reasons)}); "
            f"POST {settings.base_url}/ImagingStudy/{study_uid}/$analyze analyses it"
        )
    return (
        f"demo: analysing study {study_uid} with {settings.analyze.default_model} at start-up: once "
        f"Orthanc holds it stable ({stable_age} s) the study-arrival watcher gives it an analysis Task "
        "and the worklist runs it; the result is logged as 'Analyzed study ...' (a preliminary "
        "DiagnosticReport and an SR series in the PACS), unless the store holds its Task from an "
        "earlier start; FACADE_DEMO_ANALYZE=false turns it off"
    )


def _embedded(settings: Settings, args: argparse.Namespace) -> None:
    """Orthanc open to the facade alone (generated HTTP credentials, loopback only) and to the
    configured modalities over DICOM (ADR 0013), loaded with the demo study; then serve."""
    from pydantic import SecretStr

    from fhir_facade.demo import demo_stored, upload_demo
    from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, parse_dicom_peer
    from fhir_facade.embedded.remote_nodes import parse_remote_node

    worklist_dir = settings.worklist.folder or settings.data_dir.resolve() / "worklists"
    worklist_dir.mkdir(parents=True, exist_ok=True)
    # The worklist's own station (ScheduledStationAETitle) on this machine, and the listed ones.
    station = DicomPeer(settings.worklist.station_ae_title, "127.0.0.1")
    peers = [station, *(parse_dicom_peer(entry) for entry in settings.pacs_modalities)]
    orthanc = EmbeddedOrthanc(
        settings.data_dir.resolve() / "orthanc",
        http_port=args.orthanc_port,
        dicom_port=args.orthanc_dicom_port,
        stable_age=5,
        worklist_dir=worklist_dir,
        modalities=list(dict.fromkeys(peers)),
        aet=settings.remote_pacs.local_aet,
        remote_nodes=[parse_remote_node(entry) for entry in settings.remote_pacs.nodes],
    )
    if orthanc.credentials is None:  # http_auth defaults to on; never serve an open PACS
        raise SystemExit("fhir-facade: the embedded Orthanc has no HTTP credentials")
    user, password = orthanc.credentials
    with orthanc:
        with orthanc.client() as client:
            stored_before = demo_stored(orthanc.url, client) > 0
            study_uid = upload_demo(orthanc.url, client=client)
        overrides: dict[str, object] = {
            "dicomweb_url": orthanc.dicomweb_url,
            "orthanc_url": orthanc.url,
            "worklist_dir": worklist_dir,
            "pacs_username": user,
            "pacs_password": SecretStr(password),
        }
        if "base_url" not in settings.model_fields_set:
            overrides["base_url"] = f"http://{args.host}:{args.port}/fhir"
        settings = settings.model_copy(update=overrides)
        log.info("Demo study loaded: %s/ImagingStudy/%s", settings.base_url, study_uid)
        log.info(
            "%s",
            demo_analysis_notice(
                settings, study_uid, stable_age=orthanc.stable_age, stored_before=stored_before
            ),
        )
        log.info(
            "Orthanc's DICOM port %d (AE title %s) admits only %s",
            orthanc.dicom_port,
            orthanc.aet,
            ", ".join(f"{peer.aet}@{peer.host}" for peer in orthanc.modalities),
        )
        _serve(settings, args.host, args.port)


def _sync(settings: Settings) -> None:
    """The sync worker alone (for scale-out): the app's lifespan without HTTP or other workers."""
    import asyncio

    if not settings.fhir_upstream_url:
        raise SystemExit("fhir-facade sync: set FACADE_FHIR_UPSTREAM_URL")
    settings = settings.model_copy(
        update={"sync_in_process": True, "analyze_enabled": False, "watch_studies": False}
    )
    app = create_app(settings)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            log.info("Syncing the outbox to %s", settings.fhir_upstream_url)
            await asyncio.Event().wait()

    asyncio.run(run())


def _register_backend_client(settings: Settings, args: argparse.Namespace) -> int:
    """Register a backend client (its public JWKS) in FACADE_AUTH_CLIENTS_FILE; restart the server."""
    from fhir_facade.auth.server import RegistryError, register_backend_client

    path = settings.resolved_clients_file
    try:
        jwks = json.loads(args.jwks.read_text(encoding="utf-8"))
        register_backend_client(path, args.client_id, jwks, args.scope, name=args.name)
    except (OSError, ValueError, RegistryError) as exc:
        print(f"fhir-facade: {exc}", file=sys.stderr)
        return 2
    print(f"Registered backend client {args.client_id!r} in {path}; restart the server to use it.")
    return 0


def _set_password(settings: Settings, args: argparse.Namespace) -> int:
    """Give a registered user (default: demo) a new password: random and printed once, or read
    from stdin; only its hash is stored. The server reads the registry at start-up: restart it."""
    import secrets

    from fhir_facade.auth.server import RegistryError, set_user_password

    path = settings.resolved_clients_file
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else secrets.token_urlsafe(12)
    try:
        set_user_password(path, args.username, password)
    except RegistryError as exc:
        print(f"fhir-facade: {exc}", file=sys.stderr)
        return 2
    if args.password_stdin:
        print(f"Set the password of {args.username!r} in {path}; restart the server to use it.")
    else:
        print(
            f"New password of {args.username!r}: {password} (shown only now; its hash is in {path}). "
            "Restart the server to use it."
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fhir-facade", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the FHIR server against FACADE_DICOMWEB_URL")
    embedded = commands.add_parser(
        "embedded", help="start a local Orthanc (Debian packages) with the demo study, then serve"
    )
    for sub in (serve, embedded):
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=8080)
    commands.add_parser("sync", help="run only the upstream sync worker (FACADE_FHIR_UPSTREAM_URL)")
    register = commands.add_parser(
        "register-backend-client",
        help="add a SMART Backend Services client to the built-in authorization server's registry",
    )
    register.add_argument("--client-id", required=True)
    register.add_argument("--jwks", required=True, type=Path, help="JSON file with the client's public keys")
    register.add_argument("--scope", default="system/*.rs", help="the most the client may be granted")
    register.add_argument("--name", default=None)
    password = commands.add_parser(
        "set-password",
        help="give a user of the built-in authorization server's registry a new password (restart after)",
    )
    password.add_argument("--username", default="demo")
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin instead of generating one"
    )
    embedded.add_argument("--orthanc-port", type=int, default=8042)
    embedded.add_argument("--orthanc-dicom-port", type=int, default=4242)
    args = parser.parse_args(argv)

    settings = Settings()
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s [%(correlation_id)s] %(name)s: %(message)s",
            defaults={"correlation_id": "-"},
        )
    )
    handler.addFilter(CorrelationIdFilter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    # One line per PACS request is debugging detail, not an operator's log.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command == "register-backend-client":
        return _register_backend_client(settings, args)
    if args.command == "set-password":
        return _set_password(settings, args)
    if args.command == "serve":
        _serve(settings, args.host, args.port)
    elif args.command == "sync":
        _sync(settings)
    else:
        _embedded(settings, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
