"""The ``llkern`` command (``llkern.cli.main``) and the demos it runs."""
