"""Fixtures of the engine tests; the launching helpers are in engine_launch.py."""
import pytest


@pytest.fixture(scope="session")
def engine_base(tiny_runs):
    """(base.yaml of the tiny runs, their RUNS overrides): to rerun a tiny run under other conditions."""
    import tiny_runs as tiny_runs_script

    return tiny_runs["zero2"].run_dir.parent / "base.yaml", tiny_runs_script.RUNS
