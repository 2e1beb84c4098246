"""Table definitions, one module per database. ORM-free: the services speak SQL Core."""
