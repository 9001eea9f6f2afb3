"""Where the code runs: the CPU (gloo) backend for Megatron-Core and process-group setup."""
