"""mdpl package."""
