"""Deploy test fixtures (defined in deploy_testkit.py)."""

from deploy_testkit import deploy_broker, make_bundle, workspace

__all__ = ["deploy_broker", "make_bundle", "workspace"]
