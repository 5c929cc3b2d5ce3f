"""shopstream learning: data import, the behaviour model, training and evaluation (needs torch)."""
