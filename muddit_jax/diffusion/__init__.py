"""Masked discrete diffusion: schedules, masking, ELBO loss and the compiled sampler."""
