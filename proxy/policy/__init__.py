"""Policies: what may be forwarded, where, and how headers change. Pure functions and tables."""
