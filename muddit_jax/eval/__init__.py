"""Evaluation metrics for muddit_jax: captioning (CIDEr-D, BLEU) and VQAv2 accuracy."""
