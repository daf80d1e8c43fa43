"""A 1-rank torch process group in a plain process, for the benchmarks that run the training
step outside Ray Train (`mmdist bench mfu`, the plain-PyTorch side of `mmdist bench train`)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mmdist.errors import CommandError

# torch is imported inside the function: `mmdist bench --help` imports the bench modules, and
# with them this one, to build its parsers.
if TYPE_CHECKING:
    import torch

RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A 1-rank torch process group (gloo on CPU, NCCL on CUDA) for the block, unless one
    exists; on leaving, the group this made is destroyed and the rendezvous variables it set
    are removed again (a caller in a long process, a test, keeps its environment).

    Under ``torchrun`` the rendezvous variables are already set and are used as they are.
    """
    import torch  # heavy: not loaded for --help
    import torch.distributed as dist  # heavy: not loaded for --help

    if dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise CommandError(f"mmdist bench mfu measures one device; the process group has "
                           f"{world} ranks (use torchrun --nproc-per-node=1)")
    if dist.is_initialized():
        yield
        return
    env_before = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=int(os.environ["RANK"]), world_size=1)
        yield
    finally:
        if dist.is_initialized():
            ds_comm = sys.modules.get("deepspeed.comm")
            if ds_comm is not None and ds_comm.is_initialized():
                # DeepSpeed wrapped this group and caches it: its own destroy releases those
                # references, so an engine built under a later group in this process (a test
                # session, repeated benches) does not use the dead one ("Group ... is not
                # registered").
                ds_comm.destroy_process_group()
            else:
                dist.destroy_process_group()
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
