"""``python -m layers_core [MODEL ...] [flags]``: the same CLI as ``001_layers_and_logits/run.py``."""

import gc
import sys

from layers_core.app.main import main

if __name__ == "__main__":
    exit_code = main()
    # Everything left is freed by the OS at exit; without this the interpreter's final garbage
    # collections walk the object graph of torch, transformers and TransformerLens (≈ 1 s).
    gc.freeze()
    sys.exit(exit_code)
