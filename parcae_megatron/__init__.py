"""parcae_megatron: pretraining, evaluation and conversion of Parcae looped language models on
Megatron-Core (model/, data/, training/, evaluate/, convert/, scaling/; see README.md)."""
