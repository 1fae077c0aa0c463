"""persona core: models, data, recipe, training and evaluation. No orchestration imports here."""
