"""Pure tensor math for the training algorithms (no megatron / lightning imports)."""
