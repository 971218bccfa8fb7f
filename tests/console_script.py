"""The console script the tests run as a process, and what its stderr must never show. Light (no
torch), so the hand-run probe (``probe_hostile.py``) imports it as well as the tests."""

import os
import re
import sys

# beside the interpreter, not found on PATH: PYTHONPATH may point another copy of the package
BIN = os.path.join(os.path.dirname(sys.executable), "dhkd-pipe")
# a traceback, native log lines, or the interpreter's shutdown reports after the error line
CHATTER = re.compile(r"Traceback|\[ERROR\]|\[WARNING\]|Warning:|^\s+File \"|Task exception|Unclosed|asyncio", re.M)
