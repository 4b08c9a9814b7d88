"""Admission: the queue (``queue``), the scheduler that grants ``Ticket``s (``scheduler``),
in-flight limits per backend (``limits``) and tenants (``tenants``)."""

from proxy.admission.limits import Limits
from proxy.admission.scheduler import Scheduler, Ticket
from proxy.admission.tenants import Identity, TenantLedger, key_digest

__all__ = ["Identity", "Limits", "Scheduler", "TenantLedger", "Ticket", "key_digest"]
