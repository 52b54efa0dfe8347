"""`hack-kv serve`: the KV store service on embedded defaults (CPU tier + disk tier, no other service)."""

from __future__ import annotations

import re

import typer

from hack_transport.store.service import ServeConfig, default_cache_dir, serve
from hack_transport.store.shm import SHM_DIR

from . import app

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4GiB', '512M', '1g', '1048576' -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise typer.BadParameter(f"not a byte size: {text!r} (examples: 4GiB, 512M, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@app.command("serve")
def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 for all interfaces)."),
    port: int = typer.Option(50061, help="gRPC port (0: any free port, see --ready-file)."),
    cpu: str = typer.Option("4GiB", help="CPU tier capacity."),
    disk_dir: str = typer.Option(
        None, help=f"Disk tier directory (default: {default_cache_dir()})."
    ),
    disk: str = typer.Option("64GiB", help="Disk tier capacity (a byte quota)."),
    no_disk: bool = typer.Option(
        False, help="No disk tier (memory only; nothing survives a restart)."
    ),
    gpu: str = typer.Option("0", help="GPU tier capacity (needs CUDA; 0: no GPU tier)."),
    write_through: bool = typer.Option(
        True, help="Acknowledge a put only once it is on disk (survives kill -9)."
    ),
    disk_evict: bool = typer.Option(
        True,
        help="Evict least recently used disk chunks when the quota is reached (else refuse puts).",
    ),
    fsync: bool = typer.Option(
        True, help="fsync chunk files and directories before acknowledging."
    ),
    verify_frames: bool = typer.Option(
        False, help="Decode every put and every disk read as a wire frame (per-tensor checksums)."
    ),
    max_chunk: str = typer.Option("256MiB", help="Largest chunk accepted."),
    shm: bool = typer.Option(
        True, help="Let same-host clients exchange values through /dev/shm files (GetShm/PutShm)."
    ),
    workers: int = typer.Option(8, help="RPC worker threads."),
    max_inflight: str = typer.Option(
        "2GiB", help="Bytes of puts received at once (more: RESOURCE_EXHAUSTED, retry later)."
    ),
    metrics_port: int = typer.Option(
        None, help="Prometheus /metrics HTTP port (0: any free port)."
    ),
    metrics_host: str = typer.Option("127.0.0.1", help="Address of the metrics endpoint."),
    token: str = typer.Option(
        None, envvar="HACK_KV_TOKEN", help="Shared secret clients must send."
    ),
    tls_cert: str = typer.Option(None, help="PEM certificate (TLS on)."),
    tls_key: str = typer.Option(None, help="PEM private key of --tls-cert."),
    grace: float = typer.Option(10.0, help="Seconds in-flight RPCs get to finish on SIGTERM."),
    ready_file: str = typer.Option(
        None, help="Write {port, metrics_port, pid} as JSON here once serving."
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the gRPC KV store service until SIGTERM."""
    config = ServeConfig(
        host=host,
        port=port,
        cpu_bytes=parse_bytes(cpu),
        disk_dir="" if no_disk else disk_dir,
        disk_bytes=parse_bytes(disk),
        gpu_bytes=parse_bytes(gpu),
        write_through=write_through and not no_disk,
        disk_evict=disk_evict,
        fsync=fsync,
        verify_frames=verify_frames,
        max_chunk_bytes=parse_bytes(max_chunk),
        workers=workers,
        max_inflight_bytes=parse_bytes(max_inflight),
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        token=token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        grace_s=grace,
        ready_file=ready_file,
        log_level=log_level,
        shm_dir=SHM_DIR if shm else None,
    )
    try:
        serve(config)
    except (RuntimeError, ValueError, OSError) as e:  # it could not start: say why, no traceback
        typer.echo(f"hack-kv serve: {e}", err=True)
        raise typer.Exit(2) from None
