"""privfed simulations."""
