"""landlens.data."""
