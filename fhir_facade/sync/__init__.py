"""Reliable sync of the stored resources to an upstream FHIR server (outbox; ADR 0007)."""
