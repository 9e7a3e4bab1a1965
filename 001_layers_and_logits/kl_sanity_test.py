"""Standalone last-layer sanity check: ``python 001_layers_and_logits/kl_sanity_test.py [MODEL]``.

The same command as ``layers-and-logits self-test`` (``layers_core.app.self_test``): exit 0 on
pass, 1 on failure, 2 on bad usage; writes nothing.
"""

from __future__ import annotations

import sys

from layers_core.app.self_test import main

if __name__ == "__main__":
    sys.exit(main())
