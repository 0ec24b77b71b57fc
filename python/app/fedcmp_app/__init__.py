"""The fedcmp Flower App (see fedcmp.flower)."""
