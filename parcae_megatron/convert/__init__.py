"""Checkpoint conversion: Megatron distributed checkpoints ↔ Hugging Face ↔ the authors' format."""
