"""MPI (or torchrun, or nothing) -> torch.distributed.

Users launch with `mpiexec -n N`; rank and world size come from mpi4py, and rank 0 picks
a free port and shares the rendezvous address over MPI (loopback when all ranks share one
machine, else its host name's address; set MASTER_ADDR where that address is wrong).
Under torchrun the usual environment variables are used. A single process needs neither
and initialises no process group. Backend: nccl on GPUs (one per local rank), gloo on CPU.

A dead or stuck rank must not hang the others forever: every collective times out after
DIST_TIMEOUT_S seconds (environment variable, default 1800, torch's own default; nccl
honours it through torch's default asynchronous error handling), and a rank that fails
calls `exit_all`, which under MPI aborts the whole job: a rank that merely exits leaves
the others in MPI_Finalize, and launchers such as srun do not always kill them.
"""

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from .errors import ConfigError

TIMEOUT_ENV = "DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800
MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

_local_world_size = 1


def _mpi():
    """The mpi4py MPI module when launched by mpiexec, else None (imported lazily)."""
    if not any(k in os.environ for k in MPI_ENV_VARS):
        return None
    from mpi4py import MPI  # importing it initialises MPI, which only a job started by mpiexec may do

    return MPI


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def timeout_s():
    """Seconds a collective may wait for the other ranks before failing."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else float(DEFAULT_TIMEOUT_S)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds, got '{value}'.") from None


def setup_dist():
    """Initialise the default process group once (when there are several ranks); returns (rank, world_size)."""
    global _local_world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    MPI = _mpi()
    if MPI is not None:
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        local_rank, _local_world_size = node.Get_rank(), node.Get_size()
        node.Free()
        if world > 1:
            # Rank 0 hosts the rendezvous; loopback when every rank runs on its machine.
            if rank == 0:
                single_node = _local_world_size == world
                host = os.environ.get("MASTER_ADDR") or (
                    "127.0.0.1" if single_node else socket.gethostbyname(socket.getfqdn()))
                address = (host, _free_port())
            else:
                address = None
            host, port = comm.bcast(address, root=0)
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        _local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    else:
        rank, world, local_rank = 0, 1, 0
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if world > 1:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s()),
        )
    return rank, world


def set_cpu_threads():
    """Share the CPU cores among the ranks of this machine, unless OMP_NUM_THREADS says otherwise.

    More threads than cores (each rank using all of them) makes CPU training many times slower.
    """
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _local_world_size))


def dev():
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src=0):
    """Send a picklable object from rank `src` to every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_ranks_agree(flag):
    """True on every rank when `flag` is true on every rank (so all ranks take the same branch)."""
    if get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], device=dev() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag):
    """True on every rank when `flag` is true on some rank."""
    return not all_ranks_agree(not flag)


def sync_params(params):
    """Copy rank 0's parameter values to every rank."""
    if get_world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, 0)


def launched_with_several_ranks():
    """True when mpiexec or torchrun started more than one process (before or after setup_dist)."""
    MPI = _mpi()
    if MPI is not None:
        return MPI.COMM_WORLD.Get_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_all(code):
    """Exit with `code`, taking every other rank down too.

    Under MPI with several ranks this is MPI_Abort: the others may be blocked in a collective
    waiting for this rank, and a plain exit would leave them to run into the timeout (or,
    under some launchers, hang in MPI_Finalize).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    MPI = _mpi()
    if MPI is not None and MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)
