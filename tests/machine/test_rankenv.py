"""Local rank and local world size from each launcher's variables."""

from __future__ import annotations

import pytest

from composer_numa.errors import ComposerNumaError
from composer_numa.machine.rankenv import RankEnv, detect, parse_slurm_tasks_per_node, resolve


@pytest.mark.parametrize("env, expected", [
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}, RankEnv(3, 8, "LOCAL_RANK")),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
     RankEnv(1, 4, "openmpi")),
    ({"MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}, RankEnv(2, 3, "mpich")),
    ({"SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"}, RankEnv(5, 8, "slurm")),
    ({"SLURM_LOCALID": "2", "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"},
     RankEnv(2, 3, "slurm")),
    ({"SLURM_LOCALID": "3", "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "1"},
     RankEnv(3, 4, "slurm")),
    # the step's own list wins over the allocation's
    ({"SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "8",
      "SLURM_NODEID": "0"}, RankEnv(0, 2, "slurm")),
    ({"LOCAL_RANK": "0"}, RankEnv(0, None, "LOCAL_RANK")),
    ({}, None),
    ({"PATH": "/bin"}, None),
])
def test_detect(env, expected):
    assert detect(env) == expected


def test_torchrun_inside_srun_uses_torchrun_values():
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "SLURM_LOCALID": "0",
           "SLURM_TASKS_PER_NODE": "1"}
    assert detect(env) == RankEnv(1, 2, "LOCAL_RANK")


def test_mpirun_inside_an_sbatch_allocation_uses_mpi_values():
    # sbatch's batch step exports SLURM_LOCALID=0; Open MPI's ranks must not read it
    env = {"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "8", "SLURM_NODEID": "0",
           "OMPI_COMM_WORLD_LOCAL_RANK": "6", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    assert detect(env) == RankEnv(6, 8, "openmpi")


@pytest.mark.parametrize("text, expected", [
    ("4(x2),3", [4, 4, 3]),
    ("8", [8]),
    ("2,2,1(x3)", [2, 2, 1, 1, 1]),
    (" 1(x2) ", [1, 1]),
])
def test_parse_slurm_tasks_per_node(text, expected):
    assert parse_slurm_tasks_per_node(text) == expected


@pytest.mark.parametrize("text", ["", "4(x)", "x", "4(2)", "4(x2)3"])
def test_parse_slurm_tasks_per_node_rejects(text):
    with pytest.raises(ComposerNumaError, match="SLURM_TASKS_PER_NODE"):
        parse_slurm_tasks_per_node(text)


@pytest.mark.parametrize("env, match", [
    ({"LOCAL_RANK": "abc"}, "LOCAL_RANK='abc' is not a whole number from 0 to 65535"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a whole number from 0"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "local rank 2 from LOCAL_RANK is not below"),
    ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' is not a whole number from 1 to 65535"),
    ({"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "4", "SLURM_NODEID": "3"},
     "SLURM_NODEID=3 but SLURM_TASKS_PER_NODE='4' lists fewer than 4 node"),
    ({"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "x"}, "MPI_LOCALNRANKS='x' is not a whole number"),
])
def test_detect_errors(env, match):
    with pytest.raises(ComposerNumaError, match=match):
        detect(env)


def test_resolve_precedence_and_defaults():
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert resolve(environ=env) == RankEnv(1, 4, "LOCAL_RANK")
    assert resolve(3, environ=env) == RankEnv(3, 4, "arguments")
    assert resolve(0, 1, environ=env) == RankEnv(0, 1, "arguments")
    assert resolve(nproc=2, environ=env) == RankEnv(1, 2, "LOCAL_RANK")
    # no launcher at all: a single process
    assert resolve(environ={}) == RankEnv(0, 1, "default")
    assert resolve(nproc=4, environ={}) == RankEnv(0, 4, "default")
    # explicit values do not even look at broken variables
    assert resolve(0, 2, environ={"LOCAL_RANK": "zz"}) == RankEnv(0, 2, "arguments")


@pytest.mark.parametrize("kwargs, env, match", [
    ({"local_rank": -1}, {}, "--local-rank must be between 0 and 65535, got -1"),
    ({"nproc": 0}, {}, "--nproc must be between 1 and 65536, got 0"),
    ({"local_rank": 2, "nproc": 2}, {}, "local rank 2 .arguments. is not below"),
    ({"local_rank": 1}, {}, "local world size is not set; pass --nproc"),
    ({}, {"LOCAL_RANK": "1"}, "comes from LOCAL_RANK but the local world size is not set"),
])
def test_resolve_errors(kwargs, env, match):
    with pytest.raises(ComposerNumaError, match=match):
        resolve(environ=env, **kwargs)


def test_huge_slurm_repeat_counts_are_read_without_expanding():
    env = {"SLURM_LOCALID": "1", "SLURM_NODEID": "99999999990", "SLURM_TASKS_PER_NODE": "3,4(x99999999999)"}
    assert detect({**env, "SLURM_NODEID": "0"}) == RankEnv(1, 3, "slurm")
    with pytest.raises(ComposerNumaError, match="SLURM_NODEID="):
        detect(env)  # a node id this long is not a node of any job
    assert detect({**env, "SLURM_NODEID": "7"}) == RankEnv(1, 4, "slurm")
    with pytest.raises(ComposerNumaError, match="lists more than a million nodes"):
        parse_slurm_tasks_per_node("4(x99999999999)")
