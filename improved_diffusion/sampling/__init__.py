"""Sampling long videos: frame plans (FDM) x within-stage noise schedules (DF) x stabilization."""
