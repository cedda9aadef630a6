"""A small CLIP-style image-text dual encoder: its settings, its towers and its training."""
