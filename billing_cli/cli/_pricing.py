"""No silent zero prices: the one warning every command that rates prints."""

from __future__ import annotations

import logging

from billing_cli.cli._context import AppContext
from billing_cli.registry.model import Registry

log = logging.getLogger("billing_cli.pricing")


def pricing_state(registry: Registry) -> str:
    """``none`` when nobody set a price (everything rates at zero), else ``configured``."""
    return "none" if registry.unpriced_reason() else "configured"


def warn_if_unpriced(app: AppContext, registry: Registry) -> None:
    """One line on stderr (a log record with ``--log-format json``) when the registry
    sets no price; nothing under ``-q`` (errors only: ``billing status`` still says so)."""
    reason = registry.unpriced_reason()
    if reason is None or app.quiet:
        return
    where = "EXPORTER_BASE_URL mode" if registry.legacy else str(registry.path)
    message = f"{where}: {reason}"
    if app.log_format == "json":
        log.warning(message)
    else:
        app.err.print(f"warning: {message}", markup=False, highlight=False)
