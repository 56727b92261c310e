"""``rwkvpy serve --ray``: the serve command's options turned into a Ray Serve deployment
(:mod:`rwkvpy.server.ray_serve`), deployed, and taken down on SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading

from ..server.ray_serve import deploy, shutdown
from ..server.startup import ServeError
from .options import run_options

log = logging.getLogger("rwkvpy.server")


def replica_spec(args, api_key, states) -> dict:
    """What a replica needs from ``rwkvpy serve``'s parsed arguments (plain values)."""
    from ..hub import resolve_model
    from ..server.app import ServerConfig

    load_kw = run_options(args)
    if load_kw.get("threads") is None:
        load_kw["threads"] = 1
    name = args.model_name or (
        "demo"
        if args.model == "demo"
        else os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    )
    return {
        "model": resolve_model(args.model),  # every replica loads this file
        "load_kw": load_kw,
        "access_log": not getattr(args, "no_access_log", False),
        "tokenizer": args.tokenizer,
        "vocab": args.vocab,
        "states": [(n, os.path.abspath(p)) for n, p in states],
        "engine": {
            "max_batch": args.max_batch,
            "cache_bytes": args.cache_bytes,
            "cache_every": args.cache_every,
        },
        # every ServerConfig field that has an option of the same name
        "config": {
            **{
                f.name: getattr(args, f.name)
                for f in dataclasses.fields(ServerConfig)
                if getattr(args, f.name, None) is not None
            },
            "model_name": name,
            "api_key": api_key,
        },
    }


def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = (text or "").partition(":")
    try:
        lo, hi = int(lo), int(hi)
    except ValueError:
        raise ServeError(f"--autoscale expects MIN:MAX (replica counts), got {text!r}") from None
    if not sep or lo < 0 or hi < 1 or lo > hi:
        raise ServeError(
            f"--autoscale expects MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}"
        )
    return lo, hi


def cmd_serve_ray(args, api_key, states) -> int:
    """``rwkvpy serve --ray``: deploy, print the URL, wait for SIGINT/SIGTERM, clean up."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise ServeError(
            f"rwkvpy serve --ray needs Ray Serve: pip install 'rwkvpy[ray]' ({e.name} is missing)"
        ) from None
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    if autoscale is not None and args.replicas is not None:
        raise ServeError("give --replicas or --autoscale, not both")
    replicas = args.replicas if args.replicas is not None else 1
    if replicas < 1:
        raise ServeError(f"--replicas must be > 0, got {replicas}")
    spec = replica_spec(args, api_key, states)
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = deploy(spec, replicas=replicas, autoscale=autoscale, host=args.host, port=args.port)
        how = (
            f"autoscaling {autoscale[0]}..{autoscale[1]} replicas"
            if autoscale
            else f"{replicas} replica{'s' if replicas > 1 else ''}"
        )
        log.info("rwkvpy serve: model %r on Ray Serve, %s", spec["config"]["model_name"], how)
        log.info("rwkvpy serve: listening on %s", url)
        while not stop.wait(0.5):
            pass
        log.info("rwkvpy serve: stopping")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            shutdown()
        finally:
            if started:
                ray.shutdown()
    log.info("rwkvpy serve: stopped")
    return 0
