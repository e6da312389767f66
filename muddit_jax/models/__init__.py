"""Networks: MM-DiT generator, VQ tokenizer, CLIP text encoder, tokenizers, shared layers."""
