"""``python -m layers_core [MODEL ...] [flags]``: the same CLI as ``001_layers_and_logits/run.py``."""

from layers_core.app.main import script_main

if __name__ == "__main__":
    script_main()
