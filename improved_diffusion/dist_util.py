"""MPI (or torchrun, or nothing) -> torch.distributed.

Users launch with `mpiexec -n N`; rank and world size come from mpi4py, and rank 0 picks
a free port and shares the rendezvous address over MPI. Under torchrun the usual
environment variables are used. A single process without either works too. Backend: nccl
on GPUs (one per local rank), gloo on CPU.
"""

import datetime
import os
import socket

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


def _mpi_comm():
    """The MPI world communicator when launched by mpiexec, else None (mpi4py imported lazily)."""
    launched_by_mpi = any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_SIZE"))
    if not launched_by_mpi:
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_dist(timeout_s=DEFAULT_TIMEOUT_S):
    """Initialise the default process group once; returns (rank, world_size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    comm = _mpi_comm()
    if comm is not None:
        rank, world = comm.Get_rank(), comm.Get_size()
        if world > 1:
            host = socket.gethostbyname(socket.gethostname()) if rank == 0 else None
            port = _free_port() if rank == 0 else None
            host, port = comm.bcast((host, port), root=0)
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
        local_rank = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", rank)))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local_rank = 0, 1, 0
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world


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


def sync_params(params):
    """Copy rank 0's parameter values to every rank."""
    if get_world_size() == 1:
        return
    for p in params:
        with torch.no_grad():
            dist.broadcast(p, 0)
