"""The ``aiva`` command line."""
