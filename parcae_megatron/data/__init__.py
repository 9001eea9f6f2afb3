"""Datasets for Parcae training on top of Megatron-Core's (BOS-aligned best-fit packing)."""
