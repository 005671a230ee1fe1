"""``python tests/rkllm_standin DIR``: build the RKLLM stand-in and a stand-in model in DIR."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rkllm_standin import main  # noqa: E402

sys.exit(main())
