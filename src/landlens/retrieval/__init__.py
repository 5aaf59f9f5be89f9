"""landlens.retrieval."""
