"""Evaluation: metrics, scoring a results folder, the scheme-comparison report, plots and video files."""
