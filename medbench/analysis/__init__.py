"""Model understanding: analyses of trained networks (representation similarity)."""
