"""The default ``lite`` backbone: frozen encoders, projectors and a small Llama decoder.

Its config, processor, model and losses; design in docs/training.md#backbones.
"""
