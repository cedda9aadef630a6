"""GRACE: generative cross-modal retrieval."""
