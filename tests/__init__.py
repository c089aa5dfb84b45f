"""raywalk's tests: a package, so `tests.conftest` and `tests.helpers` are each imported once, by that name."""
