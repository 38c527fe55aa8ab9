"""Imaging intake: getting studies into the PACS under the right patient and order, and out again.

Coercion of identity attributes (with the DICOM Original Attributes Sequence), import, validation,
reconciliation of arrivals, de-identification, query/retrieve from other PACS and deletion. DICOM
machinery here is pure pydicom; the FHIR side (Patient, ServiceRequest) is read in `identity`.
"""
