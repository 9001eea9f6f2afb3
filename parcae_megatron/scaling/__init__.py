"""Scaling-law tools for looped models (FLOP accounting lives in model/accounting.py)."""
