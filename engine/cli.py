"""``tensafe generate``: one completion from the embedded engine, printed to stdout."""
from __future__ import annotations

import argparse
import asyncio
import sys

from .config import DEFAULT_MODEL, EngineConfig
from .errors import EngineError
from .types import ChatMessage, GenerationRequest, SamplingParams


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate a completion with the embedded engine")
    p.add_argument("--prompt", required=True, help="user message (or raw prompt with --raw)")
    p.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT LoRA directory to apply")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or checkpoint directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_generate(args))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .peft_dir import load_peft_dir

    adapter = None
    if args.adapter:
        adapter = load_peft_dir(args.adapter)
    engine = Engine(
        EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=1, max_loras=1,
            max_lora_rank=max(16, adapter[0].rank if adapter else 0),
        )
    )
    engine.start()
    try:
        if adapter:
            engine.load_adapter("cli", adapter[1], adapter[0])
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        request = GenerationRequest(
            request_id="cli",
            sampling=sampling,
            prompt=args.prompt if args.raw else None,
            messages=None if args.raw else [ChatMessage(role="user", content=args.prompt)],
            adapter_id="cli" if adapter else None,
        )
        async for chunk in engine.generate(request):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.shutdown()
    return 0
