"""4-bit weight quantization: group-wise int4 codes for PyTorch's CPU int4 kernel."""
