"""Small device helpers shared across the engine."""
