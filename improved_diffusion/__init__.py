"""Flexible video diffusion: train one model, sample long videos many ways."""
