"""Data: synthetic tasks generated locally (never downloaded)."""
