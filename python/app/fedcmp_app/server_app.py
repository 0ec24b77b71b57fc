"""ServerApp component: fedcmp's (see fedcmp.flower.server_app)."""

from fedcmp.flower.server_app import app

__all__ = ["app"]
