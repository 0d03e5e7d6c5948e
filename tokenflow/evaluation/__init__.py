"""Evaluation: video metrics and correspondence fields with their pictures."""
