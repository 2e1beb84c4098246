"""Compares the write store with the read database and replays what is missing."""
