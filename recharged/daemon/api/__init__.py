"""The HTTP API beyond the ops endpoints: shared plumbing (common), bodies (models), the billing page (routes)."""
