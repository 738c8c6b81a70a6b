"""``python -m pneumo``: the same as the ``pneumo`` command."""

from pneumo.cli import main

main()
