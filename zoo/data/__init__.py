"""Data: the corpus the zoo ships, and batching."""
