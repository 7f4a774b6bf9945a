"""Recipes: fine-tune, evaluate, benchmark; each reads top to bottom like a script."""
