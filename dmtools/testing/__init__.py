"""Test support shipped with dmtools: the pytest plugin, fault-injecting endpoints and helpers."""
