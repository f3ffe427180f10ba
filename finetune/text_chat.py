"""Text-only chat data that keeps plain conversation alive through visual instruction tuning.

The answers are the base model's own (greedy), so mixing them in teaches nothing new about text:
it only anchors the LoRA adapter to the base model's chat behaviour (self-distillation).

    python -m finetune.text_chat --out finetune/text_chat.jsonl
"""

from __future__ import annotations

import argparse
import json

PROMPTS = [
    "What is the capital of Germany?", "Write one sentence about dogs.", "How do I boil an egg?",
    "Give me three tips for better sleep.", "What is photosynthesis?", "Explain what a computer is to a child.",
    "What is 12 plus 7?", "Write a short poem about the sea.", "Why is the sky blue?",
    "What are the primary colors?", "Suggest a name for a pet cat.", "How many days are in a week?",
    "What does a doctor do?", "Translate 'thank you' into Spanish.", "What is the largest planet in our solar system?",
    "Give me a healthy breakfast idea.", "What is the boiling point of water in Celsius?",
    "Write a friendly greeting for a new colleague.", "What is a noun?", "How can I save money each month?",
    "Tell me a fun fact about octopuses.", "What is the difference between weather and climate?",
    "Hello! How are you today?", "What should I pack for a beach trip?", "Summarize the story of Cinderella in two sentences.",
    "What is gravity?", "List three fruits that are red.", "How do plants drink water?",
    "What is the opposite of 'happy'?", "Write a haiku about autumn.", "Who wrote Romeo and Juliet?",
    "How do I make a cup of tea?", "What is the speed of light?", "Why do we need to drink water?",
    "Describe a rainbow.", "What is a triangle?", "Give me a motivational quote.", "What language is spoken in Brazil?",
    "How do bees make honey?", "What is the capital of Japan?", "Explain what recycling means.",
    "What is the tallest mountain in the world?", "Write two sentences about winter.", "What is a verb?",
    "How can I be more productive at work?", "What do cows eat?", "Name three musical instruments.",
    "What is the moon made of?", "How do I stay calm before an exam?", "What is a healthy snack?",
    "Thank you for your help!", "Can you tell me a joke?", "What is the main ingredient of bread?",
    "Why do leaves change color in autumn?", "What is the freezing point of water?", "Describe the color blue to someone.",
    "What are clouds made of?", "How many continents are there?", "What is the purpose of a map?",
    "Write a short thank-you note to a teacher.",
]


def clean(answer: str) -> str | None:
    """Drop looping answers; cut an answer that ran out of tokens back to its last full sentence."""
    lines = [l for l in answer.splitlines() if l.strip()]
    if not lines or max(lines.count(l) for l in lines) >= 3:
        return None
    if answer.rstrip()[-1:] not in ".!?)\"'":
        cut = max(answer.rfind(". "), answer.rfind(".\n"), answer.rfind("! "), answer.rfind("? "))
        if cut < 20:
            return None
        answer = answer[:cut + 1]
    return answer.strip()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetune.text_chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args(argv)
    from assistant.model.builder import build_model
    from assistant.weights.bundled_default import untrained_default_config
    from assistant.inference.engine import Engine
    from assistant.inference.generation import GenerationConfig

    model, processor = build_model(untrained_default_config())
    engine = Engine(model, processor)
    with open(args.out, "w") as f:
        for start in range(0, len(PROMPTS), 10):
            chunk = PROMPTS[start:start + 10]
            answers = engine.answer_batch([[{"role": "user", "content": q}] for q in chunk], [[] for _ in chunk],
                                          GenerationConfig(max_new_tokens=args.max_new_tokens))
            for k, (q, a) in enumerate(zip(chunk, answers)):
                a = clean(a)
                if a is None:
                    print(f"dropped a degenerate answer to {q!r}")
                    continue
                f.write(json.dumps({"id": f"text-{start + k}", "messages": [
                    {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
            print(f"{start + len(chunk)}/{len(PROMPTS)}", flush=True)


if __name__ == "__main__":
    main()
