"""landlens.reports."""
