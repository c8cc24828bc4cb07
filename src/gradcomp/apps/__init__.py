"""Applications: data, models, recipes, training loop, experiments and the CLI."""
