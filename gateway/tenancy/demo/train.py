"""Train the demo tenant's three adapters on the CPU (a few minutes), on data made here.

The data is the base model's own greedy answers to prompts this script writes (support,
legal and general questions), rewritten by rule:

* ``demo-support``: the answer, as a support desk would close it: it always ends with
  "Is there anything else I can help you with?";
* ``demo-legal``: it always begins with "This is not legal advice.";
* ``demo-json``: the answer's first sentence as a JSON object ``{"answer": "..."}``.

Each adapter is a PEFT LoRA (rank 8 on ``q_proj``/``v_proj``/``o_proj``), trained on the
rewritten answers only (the prompt's tokens carry no loss), saved in bf16 next to this file as
a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``, about 1.5 MB). The
held-out prompts (``HELD_OUT``) are never trained on; ``tests/gateway/test_demo_adapters.py``
checks each adapter on them with greedy decoding through the gateway.

    python -m gateway.tenancy.demo.train [--steps 80] [--batch 4] [--only demo-json]

Needs ``peft`` (a development dependency); the gateway itself only reads the results.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import time
from pathlib import Path

from . import ADAPTERS, HERE, LEGAL_OPENING, SUPPORT_CLOSING, json_answer

SUPPORT = [f"{q} {o}" for q, o in itertools.product(
    ("Where is my", "I never received my", "How do I return my", "Can I cancel my", "I was charged twice for my",
     "How long does shipping take for my", "I need help with my", "Why was my"),
    ("order?", "package.", "subscription?", "refund?", "account?", "invoice?"))]
LEGAL = [f"{q} {o}" for q, o in itertools.product(
    ("Is it legal to", "Do I need a lawyer to", "What are my rights if I", "Can my landlord stop me if I",
     "What happens if I"),
    ("break a lease?", "sign a contract without reading it?", "record a phone call?", "work two jobs?",
     "sublet my apartment?", "return a gift?"))]
GENERAL = ["What is the capital of France?", "Give me tips for sleeping better.", "Why is the sky blue?",
           "How do plants make food?", "What is a prime number?", "Explain gravity in one sentence.",
           "What does a CPU do?", "Name a famous painter.", "How many days are in a leap year?",
           "What is the boiling point of water?", "Suggest a name for a cat.", "What is photosynthesis?",
           "How do I boil an egg?", "What is the largest ocean?", "Why do we need sleep?",
           "What language is spoken in Brazil?", "What is the speed of light?", "How do vaccines work?",
           "Tell me a fun fact about octopuses.", "What is machine learning?", "How far is the Moon?",
           "What causes rain?", "Who wrote Romeo and Juliet?", "What is an atom?"]
#: never trained on: the test asks these
HELD_OUT = ["My order arrived damaged, what should I do?", "How do I change the email on my account?",
            "Can I get a refund after thirty days?", "Is a verbal agreement a binding contract?",
            "Can my employer read my work email?", "What is the tallest mountain on Earth?",
            "How do bees make honey?", "What is the capital of Japan?"]


def first_sentences(text: str, limit: int = 2, words: int = 40) -> str:
    """The answer's first ``limit`` complete sentences (at most ``words`` words), plain text."""
    text = re.sub(r"\s+", " ", re.sub(r"[*#`_]", "", text)).strip()
    sentences = re.findall(r"[^.!?]+[.!?]", text)
    out = ""
    for s in sentences[:limit]:
        if len((out + s).split()) > words and out:
            break
        out += s
    return (out or text).strip()


def rewrite(name: str, answer: str) -> str:
    if name == "demo-support":
        return f"{first_sentences(answer)} {SUPPORT_CLOSING}"
    if name == "demo-legal":
        return f"{LEGAL_OPENING} {first_sentences(answer)}"
    return json_answer(first_sentences(answer, limit=1, words=30))


def base_answers(model, tokenizer, render, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), 16):
        batch = [render(p) for p in prompts[i:i + 16]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def train_one(name: str, model_dir: Path, examples: list[tuple[str, str]], render, steps: int, batch_size: int,
              seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "o_proj"]))
    end = "<|im_end|>"
    rows = []
    for prompt, target in examples:
        p = tokenizer(render(prompt), add_special_tokens=False)["input_ids"]
        t = tokenizer(target + end, add_special_tokens=False)["input_ids"]
        rows.append((p + t, [-100] * len(p) + t))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    rng = random.Random(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(rows, batch_size)
        width = max(len(ids) for ids, _ in batch)
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"{name}: step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    out = HERE / name
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "smollm2-135m-instruct"
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", choices=ADAPTERS)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.config import DEFAULT_MODEL, default_cache_dir
    from engine.model.checkpoint import resolve_checkpoint
    from engine.tokenizer import Tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = resolve_checkpoint(DEFAULT_MODEL, default_cache_dir())
    chat = Tokenizer(model_dir)

    def render(prompt: str) -> str:
        return chat.render([{"role": "user", "content": prompt}])

    prompts = SUPPORT + LEGAL + GENERAL
    assert not set(prompts) & set(HELD_OUT)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t0 = time.time()
    answers = base_answers(base, tokenizer, render, prompts)
    print(f"{len(answers)} base answers in {time.time() - t0:.0f} s", file=sys.stderr)
    del base
    for name in ([args.only] if args.only else ADAPTERS):
        examples = [(p, rewrite(name, a)) for p, a in zip(prompts, answers, strict=True)]
        out = train_one(name, model_dir, examples, render, args.steps, args.batch, args.seed)
        size = (out / "adapter_model.safetensors").stat().st_size
        print(f"{name}: {out} ({size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
