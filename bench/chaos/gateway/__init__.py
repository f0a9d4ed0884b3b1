"""The ``gateway`` fault suite, its own command (``python -m bench.chaos.gateway``, see
:mod:`bench.chaos.gateway.suite`); ``python -m bench.chaos`` runs it as a subprocess."""
