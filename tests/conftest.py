import pytest


def pytest_addoption(parser):
    parser.addoption("--stress-seeds", type=int, default=0,
                     help="run the stress tests over this many seeds (default: a small count)")


@pytest.fixture
def stress_seeds(request) -> int:
    return request.config.getoption("--stress-seeds") or 3
