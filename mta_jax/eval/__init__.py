"""Evaluation on the fixed protocol and shipped-candidate sets, and the baselines."""
