"""PyTorch reference models with the official checkpoint key layouts (test-only)."""
