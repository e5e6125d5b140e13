"""Running the repository's playbook (deploy/ansible) from tests: a private ANSIBLE_HOME,
Debian's bundled collections, and the PLAY RECAP's counts."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from pathlib import Path

ANSIBLE_DIR = REPO_ROOT / "deploy" / "ansible"
DEBIAN_COLLECTIONS = "/usr/lib/python3/dist-packages/ansible_collections"
RECAP = re.compile(
    r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)


def ansible_env(base: Path) -> dict[str, str]:
    """The environment for ansible-playbook: state under ``base``, no colours, no retry files."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "VPSRELAY_"))},
        "ANSIBLE_HOME": str(base / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(base / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(base / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_COLLECTIONS_PATH": DEBIAN_COLLECTIONS,
    }
