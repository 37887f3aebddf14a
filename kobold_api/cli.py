"""Command line: ``kobold-api serve`` and ``kobold-api prepare``."""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import PROVIDERS, QUANTS, SettingsError, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kobold-api", description="KoboldAI-compatible LLM server on ONNX Runtime")
    parser.add_argument("--settings", help="settings JSON file (default: ./settings.json if present)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="prepare the model if needed and start the server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: "
                       "the network, better with --api-key)")
    serve.add_argument("--listen", action="store_true", help="listen on the network (same as --host 0.0.0.0)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--ws-port", dest="ws_port", type=int,
                       help="text-generation-webui websocket streaming port (default 5005; 0 = off)")
    serve.add_argument("--model", help="'default', a HF model folder, a .gguf file, an ONNX folder or a hub id")
    serve.add_argument("--data-dir", dest="data_dir")
    serve.add_argument("--provider", choices=PROVIDERS)
    serve.add_argument("--quant", choices=QUANTS, help="precision of the prepared model (auto: on the CPU mixed under 0.5B "
                       "parameters, above fit for a quantized GGUF and int4 otherwise; fp16 on CUDA; fit: "
                       "4/8-bit within 1.10x the GGUF's bytes; mixed: 4-bit ffn gate/up inside, 8-bit elsewhere)")
    serve.add_argument("--api-key", dest="api_key", help="key every API request must carry (Bearer or X-Api-Key)")
    serve.add_argument("--admin-key", dest="admin_key",
                       help="key for destructive and admin routes (deleting or replacing characters)")
    serve.add_argument("--allowed-hosts", dest="allowed_hosts",
                       help="extra Host names to answer to, comma-separated (a reverse proxy's public name)")
    serve.add_argument("--cors-origins", dest="cors_origins",
                       help="extra browser origins trusted with stored chats and characters, comma-separated")
    serve.add_argument("--database-url", dest="database_url",
                       help="SQLAlchemy URL of the conversation store (default: SQLite in the data dir; replicas "
                       "share one PostgreSQL database, e.g. postgresql+psycopg2://user@host/db)")
    serve.add_argument("--characters-dir", dest="characters_dir",
                       help="folder of uploaded characters (replicas share one; default: <data dir>/characters)")
    serve.add_argument("--replica-name", dest="replica_name",
                       help="this process's name in X-Kobold-Replica, /health and /metrics (default host:port)")
    serve.add_argument("--horde-key", dest="horde_key", help="AI Horde API key: also work for the AI Horde")
    serve.add_argument("--horde-name", dest="horde_name", help="the AI Horde worker's name")
    serve.add_argument("--horde-url", dest="horde_url", help="the AI Horde (default https://aihorde.net)")
    serve.add_argument("--horde-max-length", dest="horde_max_length", type=int,
                       help="longest generation taken from the Horde (default 512)")
    serve.add_argument("--horde-max-context", dest="horde_max_context", type=int,
                       help="longest context taken from the Horde (default 2048)")
    serve.add_argument("--settings", dest="sub_settings", help=argparse.SUPPRESS)
    prepare = commands.add_parser("prepare", help="download and build a model into the cache, then exit")
    prepare.add_argument("model", nargs="?", help="as for serve --model (default: the settings' model)")
    prepare.add_argument("--data-dir", dest="data_dir")
    prepare.add_argument("--provider", choices=PROVIDERS)
    prepare.add_argument("--quant", choices=QUANTS, help="as for serve --quant")
    bench = commands.add_parser("bench", help="print decode tok/s and prefill time of the engine")
    bench.add_argument("model", nargs="?", help="as for serve --model (default: the settings' model)")
    bench.add_argument("--data-dir", dest="data_dir")
    bench.add_argument("--provider", choices=PROVIDERS)
    bench.add_argument("--quant", choices=QUANTS, help="as for serve --quant")
    bench.add_argument("--tokens", type=int, default=200, help="new tokens per decode run")
    bench.add_argument("--repeats", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {key: getattr(args, key, None) for key in ("host", "port", "ws_port", "model", "data_dir", "provider",
                                                 "quant", "api_key", "admin_key", "allowed_hosts", "cors_origins",
                                                 "database_url", "characters_dir", "replica_name", "horde_key",
                                                 "horde_name", "horde_url", "horde_max_length", "horde_max_context")}
    if getattr(args, "listen", False) and not args.host:
        overrides["host"] = "0.0.0.0"
    try:
        settings = load_settings(getattr(args, "sub_settings", None) or args.settings, overrides=overrides)
    except SettingsError as exc:
        print(f"kobold-api: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        from .engine.onnx_model import resolved_device
        from .engine.prepare import PrepareError, prepare_model

        model = args.model or settings.model
        try:
            path = prepare_model(model, resolved_device(settings.provider), settings.cache_path, progress=print,
                                 quant=settings.quant)
        except PrepareError as exc:
            print(f"kobold-api: {exc}", file=sys.stderr)
            return 1
        print(path)
        return 0
    if args.command == "bench":
        from .benchmark import main as bench_main

        bench_main(args.model or settings.model, settings.provider, settings.cache_path, args.tokens, args.repeats,
                   settings.cpu_threads, settings.quant)
        return 0
    from .server import serve

    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
