"""The multimodal backbones GRACE trains: tiny and lite built-ins, hub models, embedders, prompts.

Subpackages: :mod:`grace.models.lite` (the default backbone) and
:mod:`grace.models.dual_encoder` (the image-text embedder behind structured ids and the baseline).
"""
