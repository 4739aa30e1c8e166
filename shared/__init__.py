"""privfed shared."""
