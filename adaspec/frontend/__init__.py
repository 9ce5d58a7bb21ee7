"""Front-end helpers shared by the ``adaspec`` command and each feature's subcommand.

- :mod:`.options`: the model options (``--target --draft --dtype --device --threads
  --runtime``) and the suffix-cache options, declared once for every command.
"""
