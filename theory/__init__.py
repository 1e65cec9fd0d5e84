"""Numerical checks of the paper's claims, built on cdc.py's own operators, coupling and samplers."""
