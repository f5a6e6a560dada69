"""The ``dmtools`` command line."""
