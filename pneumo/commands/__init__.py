"""The command modules, one per sub-app; ``pneumo.cli`` assembles them into ``pneumo``.

No module here imports ``pneumo.cli``: each defines a ``typer.Typer`` (or plain command
functions) and the CLI module registers them. torch is imported only inside the commands
that need it, so ``pneumo ingest`` and ``pneumo manifest`` start fast.
"""
