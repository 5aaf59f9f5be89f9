"""landlens.cli."""
