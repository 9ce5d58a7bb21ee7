"""Learned drafting predictors: features, MLP heads, trace collection, training, calibration.

- :mod:`.features`: the per-token feature vector the ``context`` policy reads, and the
  recent-acceptance tracker shared by collection and inference (so both see the same numbers).
- :mod:`.models`: the heads (``specdecpp`` residual MLP, ``context`` MLP, ``ldlp`` length
  classifier) and their on-disk format (``model.safetensors`` + ``predictor.json``).
- :mod:`.traces`: ``adaspec collect`` (verification traces on disk).
- :mod:`.train`: ``adaspec train-predictor``.
- :mod:`.calibration`: AUC, Brier, ECE, reliability plot, Platt scaling.
"""
