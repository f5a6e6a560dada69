"""Fixtures for the snapshot tests: the plugin's ``engine`` knows the snapshot targets through the
``dmtools.targets`` entry points."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
