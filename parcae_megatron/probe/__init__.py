"""Depth probe: k-hop look-ups that show whether the loop earns its depth."""
