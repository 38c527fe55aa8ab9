# fhir-facade: the FHIR R4 facade over a DICOMweb PACS.
# Build: docker build -t fhir-facade .     Run: see docker-compose.yml

# Stage 1: build a wheel (hatchling needs the data folders it force-includes as package data).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fhir_facade ./fhir_facade
COPY capability ./capability
COPY mappings ./mappings
COPY operations ./operations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/fhir_facade-*.whl

# Stage 2: the browser code the facade serves (/app: fhirclient; /viewer: OHIF's prebuilt dist):
# the pinned tarballs of web/vendor.json, fetched with `npm pack` and checked against their sha512
# by scripts/install_web_vendor.py (ADR 0043). npm stays in this stage; only the files move on.
FROM python:3.11-slim AS web-vendor
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY web/vendor.json ./web/vendor.json
COPY scripts/install_web_vendor.py ./scripts/install_web_vendor.py
RUN python3 scripts/install_web_vendor.py run

# Stage 3: runtime, no build tools, non-root.
FROM python:3.11-slim
RUN useradd --uid 10001 --user-group --home-dir /var/lib/facade --create-home \
        --shell /usr/sbin/nologin facade \
 && mkdir -p /var/lib/facade/worklists /var/lib/facade/data \
 && chown -R facade:facade /var/lib/facade
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels fhir-facade \
 && rm -rf /wheels
COPY --from=web-vendor /src/.web-vendor /opt/fhir-facade/web-vendor

# Defaults for the compose set-up (service names orthanc, hapi, postgres); override per site.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FACADE_DATA_DIR=/var/lib/facade \
    FACADE_DICOMWEB_URL=http://orthanc:8042/dicom-web \
    FACADE_ORTHANC_URL=http://orthanc:8042 \
    FACADE_FHIR_UPSTREAM_URL=http://hapi:8080/fhir \
    FACADE_WORKLIST_DIR=/var/lib/facade/worklists \
    FACADE_BASE_URL=http://localhost:8080/fhir \
    FACADE_WEB_APP_VENDOR_DIR=/opt/fhir-facade/web-vendor \
    FACADE_LOG_LEVEL=INFO

USER facade
WORKDIR /var/lib/facade
EXPOSE 8080
# The slim image has no curl: probe the CapabilityStatement with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/fhir/metadata', timeout=4)"]
ENTRYPOINT ["fhir-facade"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
