"""Fit a lens offline: ``python 001_layers_and_logits/fit_lens.py [MODEL] [--kind tuned|jacobian] ...``.

The same command as ``layers-and-logits fit`` (``layers_core.app.fit_command``); ``--help`` lists
every flag with its default.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from layers_core.app.fit_command import main

    sys.exit(main())
