"""What the browser tests share: Debian's chromium, driven by the playwright package through its executable path.

Never `playwright install`: it downloads a browser, which cannot be reached here. Import this module first in a
browser test: it skips the whole module where chromium or playwright is missing.
"""
import shutil

import pytest

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no `chromium` on PATH (Debian: apt-get install -y chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api",
                                      reason="the playwright package drives chromium").sync_playwright

#: headless, offline, nothing started in the background that would reach the network
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
