"""privfed client."""
