import pytest

# The shared parser properties assert in tests/streams/kit.py: rewrite its asserts as pytest
# does a test module's, so a failure shows the values compared.
pytest.register_assert_rewrite("tests.streams.kit")
