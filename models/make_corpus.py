"""Generate the frequency corpus for the default draft: the target's own text on varied prompts.

A vocabulary-trimmed draft agrees with its target exactly when the target's next token is in the
draft's vocabulary, so the corpus must look like what the target actually writes: prose, chat,
code, numbers, lists. This script samples the target (greedy and at temperature 0.8) after each
prompt below and writes `cospec_local/data/corpus/gemma3_270m_samples.txt`, which ships with the project.

    python -m models.make_corpus [--tokens-per-prompt 160]
"""

from __future__ import annotations

from pathlib import Path

import click

PROMPTS = [
    "The history of the Roman Empire",
    "Once upon a time, in a small village by the sea,",
    "User: What is the capital of France?\nAssistant:",
    "User: Can you explain how photosynthesis works?\nAssistant:",
    "User: Write a short poem about the ocean.\nAssistant:",
    "User: Give me three tips for learning a new language.\nAssistant:",
    "User: How do I make a cup of tea?\nAssistant:",
    "User: What's the difference between a list and a tuple in Python?\nAssistant:",
    "User: Tell me a joke.\nAssistant:",
    "User: Summarize the plot of Romeo and Juliet.\nAssistant:",
    "def fibonacci(n):\n",
    "import numpy as np\n\n# Compute the mean and standard deviation of a list of numbers\n",
    "<!DOCTYPE html>\n<html>\n<head>\n",
    "SELECT name, COUNT(*) FROM orders",
    "function debounce(fn, delay) {\n",
    "Ingredients:\n- 2 cups of flour\n",
    "Dear Sarah,\n\nThank you for your letter.",
    "Breaking news: Scientists have discovered",
    "The quick brown fox",
    "In mathematics, a prime number is",
    "1. Preheat the oven to 180 degrees.\n2.",
    "Q: What is 17 times 23?\nA:",
    "Table of contents\n\nChapter 1:",
    "The weather today is",
    "My favorite book is",
    "How to change a flat tire:",
    "The mitochondria is the powerhouse of the cell because",
    "Climate change affects",
    "Here is a list of the planets in our solar system:",
    "Product review: I bought this laptop last month and",
    "The meeting has been moved to Thursday at 3 pm.",
    "Abstract: We propose a new method for",
    "She opened the door and saw",
    "The best way to learn programming is",
    "Step 1: Install the package with pip.\n",
    "The year was 1969, and",
    "Dear customer, your order #4521",
    "A healthy breakfast includes",
    "The results of the experiment show that",
    "Frequently asked questions\n\nQ: How long does shipping take?\nA:",
    "User: Tell me about dolphins.\nAssistant:",
    "User: What should I cook for dinner tonight?\nAssistant:",
    "User: Explain the rules of chess briefly.\nAssistant:",
    "User: How does the internet work?\nAssistant:",
    "User: Recommend a good book for a long flight.\nAssistant:",
    "User: Why is the sky blue?\nAssistant:",
    "User: What are some good habits for better sleep?\nAssistant:",
    "User: Can you help me write an email to my landlord about a broken heater?\nAssistant:",
    "User: What is machine learning?\nAssistant:",
    "User: Describe your perfect weekend.\nAssistant:",
    "User: How do airplanes fly?\nAssistant:",
    "User: What's the best way to save money?\nAssistant:",
    "The city council announced on Monday that",
    "My grandmother used to tell me stories about",
    "The football match ended in a draw after",
    "To install the software, open a terminal and",
    "The museum's new exhibition features",
    "Ten things you didn't know about the moon:\n1.",
    "He looked out of the window and noticed",
    "The company reported strong quarterly earnings, driven by",
    "class Stack:\n    def __init__(self):\n",
    "#include <stdio.h>\n\nint main(void) {\n",
    "const express = require('express');\n",
    "Error: cannot find module",
    "The patient was admitted to the hospital with",
    "In the morning, the birds",
    "The train to London departs at",
    "Our hotel was located near the beach, and",
    "Photosynthesis is the process by which",
    "The French Revolution began in 1789 when",
    "Dogs make wonderful pets because",
    "Here is a simple recipe for chocolate chip cookies:",
    "The difference between weather and climate is",
    "Once the sun had set, the travelers",
    "Mount Everest is the highest mountain",
    "Write a story about a robot who learns to paint.",
    "The capital of Japan is Tokyo, a city known for",
    "Water boils at 100 degrees Celsius, but",
    "Our team is looking for a software engineer who",
    "Thank you for contacting customer support.",
]


@click.command()
@click.option("--tokens-per-prompt", default=160, show_default=True)
@click.option("--out", default=str(Path(__file__).resolve().parents[1] / "cospec_local" / "data" / "corpus" / "gemma3_270m_samples.txt"), show_default=True)
def main(tokens_per_prompt: int, out: str) -> None:
    from tqdm import tqdm

    from cospec_local import load_pair
    from cospec_local.default_pair import target_path

    pair = load_pair(None, target_path(), n_ctx=1024)
    blocks = []
    for i, prompt in enumerate(tqdm(PROMPTS, desc="sampling the target")):
        for temperature in (0.0, 1.0):
            result = pair.generate(prompt, mode="target", max_tokens=tokens_per_prompt, temperature=temperature, seed=i)
            blocks.append(prompt + result.text)
    tmp = Path(out + ".tmp")
    tmp.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}: {sum(len(b) for b in blocks)} characters")


if __name__ == "__main__":
    main()
