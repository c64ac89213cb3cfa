"""The ``dispatcher`` command line of the core: one module per group of commands, parsed and
dispatched by :mod:`dispatcher.cli.main` (the local stack's commands live in devstack.cli)."""
