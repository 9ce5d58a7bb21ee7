"""``adaspec serve``: an OpenAI-compatible HTTP server over :class:`adaspec.SpeculativeGenerator`.

- :mod:`.protocol`: request validation and OpenAI response / chunk shapes (no web framework).
- :mod:`.scheduler`: one sequence at a time behind a bounded FIFO queue, cancellation.
- :mod:`.metrics`: Prometheus text metrics.
- :mod:`.app`: the Starlette application (``create_app``); :mod:`.cli`: the subcommand.

The web stack (Starlette, uvicorn) is the optional extra ``adaspec[serve]``; nothing here
imports it at package import time.
"""
