"""Test-suite settings shared by every test file."""

import os

# hermetic timings: no test reuses programs another test (or an earlier run on this machine) lowered
# into the per-user cache of lowered programs; the cache's own tests pass it an explicit folder
os.environ["DITNAS_CACHE_DIR"] = "off"
