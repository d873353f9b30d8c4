"""Run a module with torch's rendezvous store listening on 127.0.0.1 only.

torch's TCPStore server listens on every interface whatever host name it is given (torch 2.13: the libuv server
binds `::`), and the store has no authentication. A single-node launch needs nothing beyond loopback, so
`launch.distributed_command` starts the process that hosts the store through this module:

- torchrun's launcher (static rendezvous on 127.0.0.1:PORT): `python -m leanpo_core.loopback_store --port PORT
  torch.distributed.run ...`;
- DeepSpeed's rank 0 (the runner starts every rank as `python -m leanpo_core.loopback_store --local_rank=N MODULE
  ...`): the store port is the `MASTER_PORT` the runner sets; the other ranks just run MODULE.

This module binds the port on 127.0.0.1 itself, hands that socket to a multi-tenant TCPStore server
(`master_listen_fd`) and then runs MODULE in this process (`runpy`, as `python -m` would). torch keeps one server
per port per process for multi-tenant stores, and both torchrun's static rendezvous and `init_process_group`'s
env:// rendezvous ask for a multi-tenant store, so the server they start on that port is this one.
"""

from __future__ import annotations

import ipaddress
import os
import runpy
import socket
import sys

_HELD: list = []  # the store server and its socket, alive as long as the process


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name, resolved here: nothing is bound) names loopback addresses only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(address).is_loopback for address in addresses)


def host_store(port: int) -> None:
    """Start a TCPStore server on 127.0.0.1:`port` in this process, for the rendezvous to share."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"leanpo: cannot bind the rendezvous store to 127.0.0.1:{port}: {exc}") from exc
    sock.listen(512)
    store = dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False,
                          master_listen_fd=sock.fileno())
    _HELD.extend([sock, store])


def _store_port(argv: list[str]) -> tuple[int | None, list[str]]:
    """(the port this process should host the store on, or None; the arguments left)."""
    if argv[:1] == ["--port"]:
        return int(argv[1]), argv[2:]
    env = os.environ
    hosts = (env.get("RANK") == "0" and env.get("MASTER_PORT", "").isdigit()
             and is_loopback(env.get("MASTER_ADDR", "")) and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True")
    return (int(env["MASTER_PORT"]) if hosts else None), argv


def main(argv: list[str] | None = None) -> None:
    port, rest = _store_port(list(sys.argv[1:] if argv is None else argv))
    local_rank = [a for a in rest[:1] if a.startswith("--local_rank=")]  # DeepSpeed puts it before the module
    rest = rest[len(local_rank):]
    if not rest:
        raise SystemExit("usage: python -m leanpo_core.loopback_store [--port PORT] MODULE [ARGS...]")
    if port is not None:
        host_store(port)
    module, args = rest[0], rest[1:]
    sys.argv = [module, *local_rank, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
