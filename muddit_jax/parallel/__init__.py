"""Mesh construction and the single logical-axis to mesh-axis rules table."""
