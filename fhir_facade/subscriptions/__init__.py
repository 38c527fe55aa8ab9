"""Topic-based FHIR Subscriptions (Subscriptions R5 Backport IG 1.1.0 for R4): topics as data,
matching in the writing transaction, durable numbered events, rest-hook delivery, `$status` and
`$events` (docs/adr/0026-subscriptions-design.md)."""

from fhir_facade.subscriptions.runtime import SubscriptionRuntime

__all__ = ["SubscriptionRuntime"]
