"""Parallelism: the mesh (``mesh``), the logical-axis rules table (``rules``), logical -> mesh
shardings and global batches (``sharding``), multi-process start-up (``distributed``)."""
