"""PyTorch checkpoint port: loading, key maps, conversion and export."""
