"""Join prompt-set results: ``python 001_layers_and_logits/merge.py DIR... --out DIR``.

The same command as ``layers-and-logits merge`` (``layers_core.app.merge_command``).
"""

from __future__ import annotations

import sys

from layers_core.app.merge_command import main

if __name__ == "__main__":
    sys.exit(main())
