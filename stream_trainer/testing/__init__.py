"""Test-support code: real brokers for the test suite and for manual use."""
