"""SMART on FHIR authorization: scopes and what they grant (SMART App Launch 2.x)."""
