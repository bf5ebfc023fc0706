"""Tool-disjoint splits, candidate sampling (SD/CD) and meta-task (episode) batching."""
