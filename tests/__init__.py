"""The test suite (a package, so that tests/service is `tests.service`, not a second `service`)."""
