"""FX passes that insert FitPrune token pruning into a Dynamo-captured LLaVA decoder graph."""
