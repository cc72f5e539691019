"""The continual-learning method around the tuner: transferability (H-scores), the H-embedding (AHP targets and the
embedding fit), the training losses and the class-incremental router."""
