"""Run a function in N gloo processes on this machine (torch.multiprocessing spawn, a free port on 127.0.0.1).

Workers are module-level functions of a test module that imports this harness first: a spawned child unpickles
the function by importing its module, and importing this module makes the package importable as `calibatt` there
too (conftest does it in the parent only). A worker asserts itself; a failing rank's traceback fails the test."""

import importlib.util
import os
import pathlib
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if "calibatt" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("_calibatt_pkg", _ROOT / "scripts" / "_pkg.py")
    _pkg = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_pkg)
    _pkg.load_package()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)  # tiny tensors, shared 2-core machine: one thread per process
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """fn(rank, world, *args) in `world` gloo processes; raises if any rank fails."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
