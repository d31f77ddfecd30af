"""billing: exact, replay-safe traffic billing from many xray-exporter instances."""

__version__ = "0.1.0"
