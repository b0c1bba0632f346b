import pytest


def pytest_addoption(parser):
    parser.addoption("--stress-seeds", type=int, default=0,
                     help="run the stress tests over this many seeds (default: a small count)")


@pytest.fixture
def stress_seeds(request) -> int:
    return request.config.getoption("--stress-seeds") or 3


@pytest.fixture(autouse=True)
def _campaign_store(tmp_path, monkeypatch):
    """`smpkprobes stress` records its campaigns in a store (default
    .smpkprobes/campaigns.sqlite): each test gets its own, never the work tree's."""
    monkeypatch.setenv("SMPKPROBES_STORE", str(tmp_path / "campaigns.sqlite"))
