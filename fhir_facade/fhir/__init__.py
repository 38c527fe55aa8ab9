"""FHIR REST machinery, independent of any resource type or data source."""
