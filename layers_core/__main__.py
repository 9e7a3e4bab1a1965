"""``python -m layers_core SUBCOMMAND ...``: the same command as ``layers-and-logits``."""

from layers_core.app.commands import script_main

if __name__ == "__main__":
    script_main()
