"""Run by Python at start-up when this folder is on PYTHONPATH (tests/test_load.py's gateway
built to leak, and its analysis workers): installs tests/leaking_analyzer.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leaking_analyzer

leaking_analyzer.install_from_environment()
