"""Chat templates (placeholder until the data issue lands)."""
