"""The agreement checker: prove that a model's backends produce the same embedding space, say why
when they don't, and keep the ones that don't out of the model's compatible set."""
