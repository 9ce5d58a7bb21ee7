"""Learned drafting predictors used at decode time: features and heads.

- :mod:`.features`: the per-token feature vector the ``context`` policy reads, and the
  recent-acceptance tracker shared by collection and inference (so both see the same numbers).
- :mod:`.models`: the heads (``specdecpp`` residual MLP, ``context`` MLP, ``ldlp`` length
  classifier) and their on-disk format (``model.safetensors`` + ``predictor.json``).
- :mod:`.costs`, :mod:`.source_choice`: the measured-cost models of the ``context`` policy.

Offline parts live in :mod:`adaspec.train`: trace collection (``adaspec collect``:
:mod:`adaspec.train.traces`, :mod:`adaspec.train.replay`), fitting (``adaspec
train-predictor``: :mod:`adaspec.train.predictor`) and calibration
(:mod:`adaspec.train.calibration`).
"""
