"""Held-out prompts for greedy comparisons, and how far two greedy texts agree."""

from __future__ import annotations

from runtime.core.bundle import Bundle
from runtime.models.corpus import load_shakespeare

PROMPTS = 20
# for a chat model: questions of the kind it is asked, none from its training data we know of
CHAT_PROMPTS = (
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "What is 12 times 12?", "Who wrote Romeo and Juliet?", "What does a thermometer measure?",
    "Give me a synonym for happy.", "Why is the sky blue?", "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.", "What is photosynthesis?", "List the planets of the solar system.",
    "What is the largest ocean on Earth?", "Write a haiku about rain.", "What is a prime number?",
    "How do I make a cup of tea?", "What is the chemical symbol for gold?", "Explain what a noun is.",
    "What year did the Second World War end?", "Suggest a name for a pet cat.",
)


def held_out_prompts(bundle: Bundle) -> list[str]:
    """Chat questions for a chat model; otherwise line openings from the works the demo model never saw."""
    if bundle.answers_questions:
        return [bundle.prompt_text(question, chat=True) for question in CHAT_PROMPTS[:PROMPTS]]
    lines = [line.strip() for work in load_shakespeare().held_out for line in work.splitlines()]
    lines = [line for line in lines if len(line) > 40]
    step = len(lines) // PROMPTS
    return [lines[i * step][:60] for i in range(PROMPTS)]


def agreeing_prefix(ours: list[int], theirs: list[int]) -> int:
    """The tokens two greedy texts share before they part."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
