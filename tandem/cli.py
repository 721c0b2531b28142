"""`tandem serve | route | bench | generate | convert`."""
from __future__ import annotations

import argparse
import sys

from tandem.config import add_engine_args
from tandem.router.launch import add_router_args
from tandem.server.launch import add_server_args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, as vLLM's `--help` shows them. Left as written: a
    help that states its own default (every None default says what None means), a flag (off
    unless given), a required option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default:" in text or action.required or action.nargs == 0
                or action.default is None):
            return text
        return super()._get_help_string(action)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--top-k", type=int, default=-1, help="most likely tokens kept (-1: all)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the top one's probability (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="0: off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="0: off")
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="seed of this request (default: none, the engine's random state)")
    g.add_argument("--stop", action="append", default=None,
                   help="stop at this string (repeat for several; default: none)")


def cmd_generate(args: argparse.Namespace) -> int:
    from tandem.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.sampling_params import SamplingParams
    from tandem.loader.tokenizer import render_chat

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, seed=args.sampling_seed,
                            stop=args.stop)
    config = EngineConfig.from_args(args)
    if config.node_rank > 0:  # a compute-only node of a multi-node group
        from tandem.distributed.worker import run_node

        return run_node(config)
    engine = LLMEngine(config)  # after the cheap checks above
    prompt = args.prompt
    if args.chat:
        _, prompt = render_chat(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    engine.add_request("cli", prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tandem.server.launch import serve

    return serve(args)


def cmd_route(args: argparse.Namespace) -> int:
    from tandem.router.launch import route

    return route(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        from tandem.bench.serve import bench_serve

        res = bench_serve(args)
    else:
        from tandem.bench.sweep import bench_sweep

        res = bench_sweep(args)
    failed = res["failed"] if isinstance(res, dict) else sum(p["failed"] for p in res)
    return 1 if failed else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tandem.loader.gguf import convert_gguf

    convert_gguf(args.src, args.dest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout",
                         usage="%(prog)s --prompt PROMPT [options]", formatter_class=HelpFormatter)
    gen.add_argument("--prompt", required=True, help="the text to continue, or with --chat to answer")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                         usage="%(prog)s [options]", formatter_class=HelpFormatter)
    add_engine_args(srv)
    add_server_args(srv)
    srv.set_defaults(func=cmd_serve)
    rt = sub.add_parser("route", help="route OpenAI requests over several replicas",
                        usage="%(prog)s [options]", formatter_class=HelpFormatter)
    add_router_args(rt)
    rt.set_defaults(func=cmd_route)
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible server")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    from tandem.bench.serve import add_serve_args
    from tandem.bench.sweep import add_sweep_args

    add_serve_args(bsub.add_parser("serve", help="one load level: latency and throughput"))
    add_sweep_args(bsub.add_parser("sweep", help="several load levels, one table and plot"))
    bench.set_defaults(func=cmd_bench)
    conv = sub.add_parser("convert", help="convert a GGUF file into an HF checkpoint folder")
    conv.add_argument("src")
    conv.add_argument("dest")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
