"""Shared pytest fixtures for the powernorm-fairseq test-suite."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "powernorm_plugin")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def user_dir():
    """The plugin folder to pass to ``--user-dir``."""
    return USER_DIR
