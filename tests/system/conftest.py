"""Session-wide real services for tests/system (every test there is marked `system`)."""
from __future__ import annotations

import pytest
from ops_services import SlurmCluster, free_port, start_mlflow_server, stop_group


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts); yields its URL."""
    proc, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    yield url
    stop_group(proc)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real SLURM cluster on this machine: controller + two node daemons (node1, node2), 4 CPUs each."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=4)
    yield cluster
    cluster.stop()
