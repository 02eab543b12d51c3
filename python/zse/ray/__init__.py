"""ZSE replicas on Ray Serve (``pip install 'zse[ray]'``): several engines behind
one endpoint, for when one machine is not enough.

``zse serve --ray --replicas N`` runs `serve_on_ray`; people who write their own
Ray Serve apps deploy `build_app`'s application::

    from ray import serve
    import zse.ray
    from zse.server.options import ServeOptions

    serve.run(zse.ray.build_app(ServeOptions(model="model.zse"), replicas=4))

- `deployments`: `ZseReplica` (an engine and ZSE's own FastAPI app), `ZseIngress`
  (forwards each request to a replica and streams its answer back);
- `router`: `PrefixAffinityRouter`, the same replica for the same prompt prefix
  while it has room, else the least loaded;
- `asgi`: one request through an ASGI app in process, its response streamed.

Rate limits are counted across replicas (one actor holds them); managed keys are
the SQLite file ``--keys-db`` names, which every replica opens: on several machines,
a path on shared storage.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import uuid
from dataclasses import fields, replace
from typing import Any

from ..server.context import DEFAULT_MAX_BODY_BYTES
from ..server.options import ServeOptions

__all__ = ["app_builder", "build_app", "serve_on_ray"]


def build_app(
    opts: ServeOptions,
    replicas: int = 2,
    *,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float = 0,
    prefix_affinity: bool = True,
) -> Any:
    """The Ray Serve application: ``replicas`` copies of the engine ``opts`` asks for
    behind one ingress. Each replica reserves ``cpus_per_replica`` CPUs (default:
    ``opts.threads``, else 1), which its engine's threads use, and
    ``gpus_per_replica`` GPUs. ``prefix_affinity=False`` routes with Ray's default
    (power of two choices) instead of `PrefixAffinityRouter` (for comparison)."""
    from .deployments import ZseIngress, ZseReplica, deployment_args

    if replicas < 1:
        raise ValueError("invalid value for 'replicas': must be at least 1")
    cpus = cpus_per_replica if cpus_per_replica is not None else float(opts.threads or 1)
    if opts.threads is None:
        # The engine's threads, one per CPU the replica reserved.
        opts = replace(opts, threads=max(1, int(cpus)))
    options = deployment_args(replicas, cpus, gpus_per_replica, opts, prefix_affinity)
    replica = ZseReplica.options(**options).bind(opts, f"zse-limits-{uuid.uuid4().hex[:12]}")
    # The ingress only forwards: it takes as many requests at once as the engines
    # together run and queue (Ray's default, 5, would queue them in its proxy).
    capacity = replicas * (opts.max_sequences + opts.max_queue)
    ingress = ZseIngress.options(max_ongoing_requests=capacity)
    return ingress.bind(replica, DEFAULT_MAX_BODY_BYTES)


def app_builder(args: dict[str, Any]) -> Any:
    """`build_app` from a Ray Serve config file's ``args`` (``import_path:
    zse.ray:app_builder``, as KubeRay's RayService takes it): ``replicas``,
    ``cpus_per_replica``, ``gpus_per_replica``, and any `ServeOptions` field (``model``,
    ``max_sequences``, ``keys_db``, ``rate_limit_rpm``, ...)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    cpus = args.pop("cpus_per_replica", None)
    gpus = float(args.pop("gpus_per_replica", 0))
    known = {f.name for f in fields(ServeOptions)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown zse.ray argument(s) {unknown}; known: {sorted(known)}")
    for name in ("api_keys", "cors_origins"):  # lists in YAML, tuples in ServeOptions
        if name in args:
            args[name] = tuple(args[name])
    return build_app(
        ServeOptions(**args),
        replicas,
        cpus_per_replica=None if cpus is None else float(cpus),
        gpus_per_replica=gpus,
    )


def serve_on_ray(
    opts: ServeOptions,
    replicas: int,
    *,
    address: str | None = None,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float = 0,
) -> int:
    """`zse serve --ray`: joins the Ray cluster at ``address`` (default: the one
    ``RAY_ADDRESS`` names or that runs on this machine, else a new local one),
    deploys `build_app` on ``opts.host``:``opts.port`` (where Serve already runs on
    that cluster, on its own address) and serves until SIGINT or SIGTERM, then takes
    the application down."""
    import ray
    from ray import serve

    ray.init(address=address, namespace="zse", log_to_driver=False)
    # After ray.init, whose own handler would abort the process on SIGTERM; before
    # the deployment, so that a signal while it starts stops it once it is up.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        app = build_app(
            opts, replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica
        )
        serve.run(app, name="zse", route_prefix="/")
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        cpus = cpus_per_replica if cpus_per_replica is not None else opts.threads or 1
        lines = [
            "ZSE serving on Ray Serve",
            f"  model     {opts.model or 'the default model'}",
            f"  replicas  {replicas}, each {cpus:g} CPUs and {gpus_per_replica:g} GPUs",
            f"  URL       http://{host}:{opts.port}/v1",
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        # Only this application: on a cluster others share, Serve and their apps stay
        # (a local cluster this call started goes with ray.shutdown).
        with contextlib.suppress(Exception):
            serve.delete("zse")
        ray.shutdown()
    return 0
