"""Tasks: prompts and label words, their data and splits, batches for the graph, the objective."""
