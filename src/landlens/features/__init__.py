"""landlens.features."""
