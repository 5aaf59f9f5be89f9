"""landlens.models."""
