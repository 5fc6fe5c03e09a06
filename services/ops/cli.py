"""``cbmir``: one command line for every part of the system.

Long-running parts (``scp``, ``worker``, ``query``, ``serve``, ``watch``) build their own settings
from the environment in their ``main()``; the worker runs as ``python -m workers`` because
``services/`` never imports ``workers/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.core.vocabulary import MODALITIES


def _cmd_search(args) -> int:
    from services.query.client import SearchClient, hit_dict

    client = SearchClient(args.server)
    try:
        if args.uid:
            response = client.search(sop_instance_uid=args.uid, k=args.k, modalities=args.modality,
                                     exclude_same_study=args.exclude_same_study)
        else:
            image_modality = args.image_modality or (args.modality[0] if args.modality else None)
            response = client.search_file(Path(args.file), k=args.k, modalities=args.modality,
                                          image_modality=image_modality, exclude_same_study=args.exclude_same_study)
    except Exception as exc:
        return _rpc_failure(exc)
    for hit in response.hits:
        print(json.dumps(hit_dict(hit)))
    return 0


def _cmd_stats(args) -> int:
    from services.query.client import SearchClient, stats_dict

    client = SearchClient(args.server)
    try:
        print(json.dumps(stats_dict(client.stats()), indent=2))
    except Exception as exc:
        return _rpc_failure(exc)
    return 0


def _rpc_failure(exc: Exception) -> int:
    import grpc

    if isinstance(exc, grpc.RpcError):
        print(f"cbmir: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    raise exc


def _cmd_worker(args) -> int:
    argv = [sys.executable, "-m", "workers"] + (["--concurrency", str(args.concurrency)] if args.concurrency else [])
    os.execv(sys.executable, argv)
    return 0  # not reached


def _cmd_serve(args) -> int:
    from services.core.logs import configure_logging
    from services.ops.serve import ServeOptions, run

    configure_logging()
    options = ServeOptions(
        data_dir=Path(args.data_dir).expanduser().resolve(),
        dicom_port=args.dicom_port,
        grpc_port=args.grpc_port,
        ae_title=args.ae_title,
        host=args.host,
        watch_dir=Path(args.watch).expanduser().resolve() if args.watch else None,
    )
    return run(options)


def _cmd_demo(args) -> int:
    from services.ops.demo import run_demo

    return run_demo(args)


def _passthrough(module: str):
    def run(args) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest)

    return run


def _model_command(module_name: str):
    """``cbmir train|export|evaluate``: the models package defines the arguments and the run."""
    import importlib

    module = importlib.import_module(module_name)
    return module.add_arguments, module.run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbmir", description="Content-based medical image retrieval next to the PACS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, module, text in (
        ("scp", "services.ingest.listener", "run the DICOM C-STORE listener"),
        ("query", "services.query.service", "run the gRPC query service (owns the embedded index)"),
        ("watch", "services.ingest.watcher", "watch a folder for dropped DICOM, PNG/JPEG and EDF files"),
        ("reindex", "services.ops.reindex", "re-embed the archive into a new collection, then switch the alias"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_passthrough(module))

    p = sub.add_parser("worker", help="run a Celery embedding worker")
    p.add_argument("--concurrency", type=int)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("serve", help="listener + worker + gRPC on one machine, embedded broker and index")
    p.add_argument("--data-dir", default=os.environ.get("CBMIR_DATA_DIR", "./var"))
    p.add_argument("--dicom-port", type=int, default=int(os.environ.get("CBMIR_DICOM_PORT", "11112")))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("CBMIR_GRPC_PORT", "50051")))
    p.add_argument("--ae-title", default=os.environ.get("CBMIR_AE_TITLE", "CBMIR"))
    p.add_argument("--host", default="127.0.0.1", help="address both servers bind (default loopback)")
    p.add_argument("--watch", metavar="DIR", help="also run the file watcher on DIR")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("search", help="find similar cases (prints one JSON object per hit)")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--file", help="a DICOM file, or a PNG/JPEG (then give its modality)")
    target.add_argument("--uid", help="SOP Instance UID of an indexed instance")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--modality", action="append", default=[], choices=MODALITIES,
                   help="restrict hits to this modality (repeatable)")
    p.add_argument("--image-modality", choices=MODALITIES,
                   help="modality of a PNG/JPEG query (default: the first --modality)")
    p.add_argument("--exclude-same-study", action="store_true")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("stats", help="index statistics as JSON")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("demo", help="run the whole path on this machine and print similar cases")
    p.add_argument("--data-dir", help="keep the demo's data here (default: a temporary folder)")
    p.add_argument("--per-modality", type=int, default=12, help="shared-data images per modality, when ../shared exists")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=_cmd_demo)

    for name, module, text in (
        ("train", "models.train", "train an encoder"),
        ("export", "models.export", "export an encoder to ONNX (checker + parity enforced)"),
        ("evaluate", "models.evaluate", "evaluate retrieval on a manifest"),
        ("dicomize", "services.dicom.dicomize", "build DICOM objects from images and signals"),
    ):
        p = sub.add_parser(name, help=text)
        p.set_defaults(model_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Commands owned by other modules get their full parser from that module.
    if argv and argv[0] in ("train", "export", "evaluate", "dicomize"):
        module = {"train": "models.train", "export": "models.export", "evaluate": "models.evaluate",
                  "dicomize": "services.dicom.dicomize"}[argv[0]]
        if argv[0] == "evaluate" and "--server" in argv:
            module = "services.ops.evaluate"
        add_arguments, run = _model_command(module)
        parser = argparse.ArgumentParser(prog=f"cbmir {argv[0]}")
        add_arguments(parser)
        from services.core.logs import configure_logging

        configure_logging()
        return int(run(parser.parse_args(argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
