"""fitprune-fx: FitPrune visual-token pruning for LLaVA models as a torch.compile backend."""
