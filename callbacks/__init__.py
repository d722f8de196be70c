"""Callbacks that decide *when* things happen during training."""
