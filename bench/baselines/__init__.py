"""Baselines Shoal is measured against that are small enough to live here."""
