"""Logging for people and machines: key=value lines on stderr naming the service.

Request ids travel in messages as ``request_id=...``, so one grep follows a request across the
router, the prefill ranks and the decode worker.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(service: str, quiet: bool = False) -> None:
    """Configure the root logger once per process."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s level=%(levelname)s service={service} logger=%(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        force=True,
    )
