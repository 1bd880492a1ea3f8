"""Schedules, samplers and guidance for diffusion priors (pure functions, no Lightning)."""
