"""Weights and tokenizers: resolve a model argument to an HF checkpoint folder."""
