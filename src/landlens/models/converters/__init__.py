"""landlens.models.converters."""
