"""The real all-MiniLM-L6-v2 encoder (loaded once per session) and a small handmade table."""
from __future__ import annotations

import asyncio

import pytest

from router import Encoder, ExpertTable

TABLE = {
    "default": "general",
    "experts": [
        {"name": "general", "adapter": "general-lora",
         "description": "Everyday questions about history, science, travel and advice.",
         "keywords": [{"pattern": "history"}, {"pattern": "travel"}],
         "examples": ["Who was the first emperor of Rome?", "Why is the sky blue?",
                      "What should I pack for a week in Iceland?", "How do vaccines work?"]},
        {"name": "code", "adapter": "code-lora",
         "description": "Programming: writing and debugging code, SQL, shell scripts.",
         "keywords": [{"pattern": "python", "weight": 2.0}, {"pattern": "sql", "weight": 2.0},
                      {"pattern": r"\bdef\b", "weight": 2.0, "regex": True}],
         "examples": ["Write a function that reverses a linked list.",
                      "Why does my program crash with a null pointer exception?",
                      "How do I join two tables and count the rows per group?",
                      "My loop never terminates, what is wrong with this code?"]},
        {"name": "math", "adapter": "math-lora",
         "description": "Mathematics: arithmetic, algebra, calculus, probability.",
         "keywords": [{"pattern": "integral", "weight": 3.0}, {"pattern": "math", "weight": 1.0},
                      {"pattern": "equation", "weight": 2.0}],
         "examples": ["What is 17 times 23?", "Find x if 3x + 7 = 22.",
                      "What is the probability of rolling two sixes?", "Differentiate x^3 + 2x."]},
        {"name": "writing", "adapter": "writing-lora",
         "description": "Creative and professional writing: poems, stories, emails, editing.",
         "keywords": [{"pattern": "poem", "weight": 3.0}, {"pattern": "rewrite", "weight": 2.0}],
         "examples": ["Write a short story about a lighthouse keeper.",
                      "Make this email sound more polite.", "Compose a haiku about autumn rain.",
                      "Proofread my cover letter."]},
    ],
}


@pytest.fixture(scope="session")
def encoder():
    enc = Encoder()
    yield enc
    asyncio.run(enc.aclose())


@pytest.fixture()
def table() -> ExpertTable:
    return ExpertTable.from_dict(TABLE)
