"""The lens: protocol, unembedding, vectorised statistics, tuned lens and its fit."""
