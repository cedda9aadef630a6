"""Shared fixtures live in tests/fixtures/, one module per concern; test servers beside them."""

pytest_plugins = ["tests.fixtures.training", "tests.fixtures.kfp", "tests.fixtures.registry"]
