"""SMART on FHIR security: bearer-token validation and scopes (not wired into the app yet)."""
