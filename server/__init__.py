"""privfed server."""
