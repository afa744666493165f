"""Object priors: the offline statistical fallback and Grounded SAM from user checkpoints."""
