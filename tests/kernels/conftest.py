import pytest


@pytest.fixture(scope="session")
def sm90_results() -> dict:
    """Compile results of recorded launches by launch id, kept for the whole session, so the tests
    that compile launches for sm_90 (each file imports the recording module under its own name)
    compile each launch once."""
    return {}
