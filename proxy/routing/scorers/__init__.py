"""Scorers: one module each, registered by type name (see ``proxy.routing.registry``)."""
