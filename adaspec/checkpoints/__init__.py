"""Model files: finding, loading and saving checkpoints and their formats.

- :mod:`.loader`: a target or draft by name (``default``, a local directory, an HF id), the
  cached GGUF of the default target, dtype selection, the vocabulary compatibility check.
- :mod:`.subset_draft`: the shipped draft's format (a reduced-output-vocabulary LM head).
- :mod:`.feature_head`: the feature head's format (drafts from the target's hidden states).

``adaspec.load_model`` is :func:`.loader.load_model`.
"""
