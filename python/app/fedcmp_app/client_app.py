"""ClientApp component: fedcmp's (see fedcmp.flower.client_app)."""

from fedcmp.flower.client_app import app

__all__ = ["app"]
