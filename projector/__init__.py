"""The read side: consumes the events and builds the denormalized read database."""
