"""``python -m dare_gym ...`` is the ``dare-gym`` command (``torchrun ... -m dare_gym train ...`` launches ranks)."""

import sys

from dare_gym.tools.cli import main

sys.exit(main())
