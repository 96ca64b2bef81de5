"""Selection quality benchmark: TRIM against baselines on real pools, targets and held-out splits."""
