"""Models of vocalign-hf."""
