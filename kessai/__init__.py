"""kessai: the shared core of the payment ledger.

Event contract, money, settings, DB and broker plumbing, the CLI."""

__version__ = "0.1.0"
