"""The merchant dashboard API, served from the read database only."""
