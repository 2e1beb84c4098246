"""The ``kessai`` command and the process supervisor of ``kessai up``.

This package sits above everything else: it composes the services (``command_service``,
``query_service``, ``projector``, ``reconciler``) and the core (``kessai``) into commands, and
nothing but the benches and the tests import it. The load generator lives here too: a tool for
operators, not part of the service.
"""
