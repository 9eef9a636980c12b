"""Using a model without training it: evaluation tasks, scaling-law fits."""
