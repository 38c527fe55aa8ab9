"""Audit: an AuditEvent (FHIR R4) for every FHIR, DICOMweb and operation request, stored as a
persistent, read-only resource and synced upstream like the others (docs in each module).

Wiring (app.py): `recorder = audit_recorder(settings, store)`, its `audit_stage` in the interaction
pipeline, `install_audit(app, settings, recorder)` in create_app, then
`await recorder.start()` / `await recorder.stop()` in the lifespan when it is not None.
"""

from fhir_facade.audit.event import audit_event, audit_outcome
from fhir_facade.audit.interaction import Interaction, describe_interaction, is_audited
from fhir_facade.audit.middleware import AuditMiddleware, audit_recorder, audit_stage, install_audit
from fhir_facade.audit.recorder import AuditRecorder

__all__ = [
    "AuditMiddleware",
    "AuditRecorder",
    "Interaction",
    "audit_event",
    "audit_outcome",
    "audit_recorder",
    "audit_stage",
    "describe_interaction",
    "install_audit",
    "is_audited",
]
