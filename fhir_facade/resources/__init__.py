"""One provider per FHIR resource type."""
