"""Debian tools some tests drive for real (prometheus, chromium): installed on demand when root, else a skip
that says why and how to install them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def require_binary(binary: str, package: str) -> str:
    """Path of `binary`; installs the Debian `package` first when missing and this process is root."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{binary} is missing and this is not a root Debian shell: apt-get install -y {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"could not install {package} ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}")
    found = shutil.which(binary)
    if not found:
        pytest.skip(f"apt-get installed {package} but {binary} is not on PATH")
    return found
