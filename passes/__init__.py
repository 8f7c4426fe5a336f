"""FX passes that insert FitPrune token pruning into a Dynamo-captured multimodal decoder graph."""
