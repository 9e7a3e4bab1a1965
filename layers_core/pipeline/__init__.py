"""One prompt or a batch through the model: forward, rows, checks."""
