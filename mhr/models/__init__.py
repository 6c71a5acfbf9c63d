"""Backbones: one file per model (DESIGN §6)."""
