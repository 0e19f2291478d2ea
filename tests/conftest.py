"""pytest configuration: the app's code is imported as ``lib.*`` from apps/ensam."""

import os
import sys

_APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apps", "ensam")
if _APP not in sys.path:
    sys.path.insert(0, _APP)
