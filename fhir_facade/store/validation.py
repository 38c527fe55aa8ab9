"""What every write checks before it touches the database: a resourceType, a valid id, the R4B
structure and the required bindings (FHIR R4 http.html#create: 400 on failure)."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from fhir_facade.fhir.errors import bad_request, not_found
from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.required_bindings import check_required_bindings
from fhir_facade.store.errors import invalid_resource

__all__ = ["check_id", "check_type", "validate_resource"]


def check_type(resource: dict[str, Any]) -> str:
    resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(resource_type, str):
        raise bad_request("The body is not a FHIR resource (no resourceType)", expression="resourceType")
    return resource_type


def check_id(resource_type: str, resource_id: str) -> None:
    if not is_fhir_id(resource_id):
        raise not_found(f"{resource_type}/{resource_id} is not a valid resource id")


def validate_resource(resource_type: str, resource: dict[str, Any]) -> None:
    """Basic FHIR validation (http.html#create: 400 on failure): the structure with the R4B
    models, then the required terminology bindings, which the models do not enforce
    (fhir/required_bindings.py, ADR 0015). Every write, the server's own included, comes here."""
    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError) as exc:
        raise bad_request(
            f"'{resource_type}' is not an R4 resource type",
            expression="resourceType",
            code="not-supported",
        ) from exc
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        raise invalid_resource(resource_type, exc) from exc
    check_required_bindings(resource)
