"""Datasets and the input pipeline.

``schema`` (common record layout, TFDS builder base), ``shapes`` (the embedded synthetic
generator) + ``shapes_tfds``, ``coco`` / ``vqav2`` / ``folder`` (local-file builders),
``registry`` (names -> builders / data sources), ``preprocess`` + ``text`` (record -> example),
``pipeline`` (the deterministic, checkpointable, host-sharded iterator), ``pretokenize``
(offline VQ encoding).
"""
