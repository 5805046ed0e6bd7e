"""Test-session set-up shared by every suite (see programs/__init__.py for why)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
