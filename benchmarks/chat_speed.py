"""Chat speed on this machine, one JSON line: decode tokens/s of our engine (as `serve.py` runs it:
--quantize auto) against plain transformers `generate` in fp32 on the same model (adapter merged),
and against llama.cpp on the same SmolLM2 GGUF when its llama-bench (scripts/build_llama_bench.sh) or
llama-cpp-python is installed (the row is skipped otherwise); how often the engine's weights pick
fp32's next token along fp32's greedy answers (teacher-forced; 1.0 for fp32); time to first token
for a new image + question, and at turn 8 against turn 1 of one conversation. Medians of several
runs, measured side by side.

    python benchmarks/chat_speed.py [--model default] [--quantize auto] [--repeats 3] [--new-tokens 64]
                                    [--llama-bench PATH] [--no-compile]"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.cpu.compiled_decoder import wait_for_compiled_steps  # noqa: E402
from assistant.inference.engine import ChatSession, Engine  # noqa: E402
from assistant.inference.generation import GenerationConfig  # noqa: E402
from assistant.weights.loading import load_for_inference, load_model  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "server" / "examples"


def engine_decode_rate(engine, n_tokens) -> float:
    session = ChatSession()
    session.add_user_message(PROMPT)
    cfg = GenerationConfig(max_new_tokens=n_tokens)
    stream = engine.stream_chat(session, cfg)
    next(stream)  # first token: prefill done
    t = time.perf_counter()
    rest = sum(1 for _ in stream)
    generated = session.usage["completion_tokens"] - 1
    return generated / (time.perf_counter() - t) if rest or generated else 0.0


PROMPT = "Write a long story about a dragon who learns to paint."


def chat_ids(processor, text: str):
    """The token ids of a one-message chat prompt, as the LLM sees them (1 x length)."""
    return processor.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]


def plain_generate_rate(llm, processor, n_tokens) -> float:
    """The baseline: transformers' generate on the bare LLM, greedy, fp32, same prompt."""
    ids = chat_ids(processor, PROMPT)
    with torch.inference_mode():
        t = time.perf_counter()
        first = llm.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = llm.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        total = time.perf_counter() - t
    assert first.shape[1] == ids.shape[1] + 1
    return (out.shape[1] - ids.shape[1] - 1) / max(total - prefill, 1e-9)


LLAMA_CPP_CHILD = """
import sys, time
from llama_cpp import Llama
path, threads, n_tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, n_threads=threads, n_ctx=1024, verbose=False)
stream = llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, stream=True)
next(stream)
t = time.perf_counter()
rest = sum(1 for _ in stream)
print(rest / (time.perf_counter() - t))
"""


def llama_bench_rate(binary: str, processor, n_tokens) -> float | str:
    """llama.cpp's own llama-bench on the GGUF our builtin SmolLM2 comes from: `n_tokens` decode steps after
    as many context tokens as our prompt has, same threads. The context is filled one token per batch
    (-b 1 -ub 1): on this machine the batched prompt kernels of a -march=native build stop with an illegal
    instruction, while decoding, the measured part, is unaffected."""
    import subprocess

    from assistant.weights.llm import builtin_gguf_path

    depth = chat_ids(processor, PROMPT).shape[1]
    cmd = [binary, "-m", str(builtin_gguf_path("smollm2-135m-instruct")), "-t", str(torch.get_num_threads()),
           "-p", "0", "-n", str(n_tokens), "-d", str(depth), "-b", "1", "-ub", "1", "-r", "1", "-o", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except OSError as e:  # not there, not executable
        return f"failed: --llama-bench {binary}: {e}"
    if proc.returncode != 0:
        return f"failed: llama-bench exited with {proc.returncode} ({proc.stderr.strip()[-200:]})"
    return float(json.loads(proc.stdout)[0]["avg_ts"])


def llama_cpp_rate(processor, n_tokens, llama_bench: str | None = None) -> float | str:
    """llama.cpp on the GGUF our builtin SmolLM2 comes from, same threads, greedy: its llama-bench binary
    when given (--llama-bench, $LLAMA_BENCH or on PATH; scripts/build_llama_bench.sh builds one), else
    llama-cpp-python in a child process (a build that crashes, as one built here did, costs this row only)."""
    import importlib.util
    import subprocess

    if llama_bench:
        return llama_bench_rate(llama_bench, processor, n_tokens)
    if importlib.util.find_spec("llama_cpp") is None:
        return "skipped: neither llama-bench nor llama-cpp-python is installed"
    from assistant.weights.llm import builtin_gguf_path

    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                     tokenize=False)
    proc = subprocess.run([sys.executable, "-c", LLAMA_CPP_CHILD, str(builtin_gguf_path("smollm2-135m-instruct")),
                           str(torch.get_num_threads()), str(n_tokens), prompt], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        return f"failed: llama-cpp-python exited with {proc.returncode} ({proc.stderr.strip()[-200:]})"
    return float(proc.stdout.strip().splitlines()[-1])


FIDELITY_PROMPTS = ["What is the capital of Italy?", "Give me two tips for staying focused while studying.",
                    "Write one sentence about the ocean.", "Why do people exercise?", "List five colours.",
                    "Write a short story about a cat in three sentences.", "What are the days of the week?",
                    "Explain in one sentence what a library is."]


@torch.inference_mode()
def token_agreement(fast_model, runtime, fp32_llm, processor, n_tokens) -> float:
    """How often the fast path picks fp32's next token along fp32's own greedy answers (teacher-forced:
    the prompt prefilled, then one token per step as in a chat, through the compiled steps when the
    engine has them), over FIDELITY_PROMPTS."""
    import contextlib

    from transformers import DynamicCache

    fast_llm, compiled = fast_model.llm, runtime.decoder
    agree = total = 0
    for prompt in FIDELITY_PROMPTS:
        ids = chat_ids(processor, prompt)
        answer = fp32_llm.generate(ids, max_new_tokens=n_tokens, do_sample=False)[0, ids.shape[1]:]
        cache = DynamicCache(config=fast_llm.config)
        logits = fast_llm(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        steps = compiled.steps(cache, torch.ones_like(ids), len(answer)) if compiled else contextlib.nullcontext()
        with steps as step:
            for k, token in enumerate(answer.tolist()):
                agree += int(logits.argmax().item() == token)
                total += 1
                if k + 1 < len(answer) and step is not None:
                    logits = step(answer[k:k + 1])[0]
                elif k + 1 < len(answer):
                    logits = fast_llm(input_ids=answer[None, k:k + 1], past_key_values=cache,
                                      use_cache=True).logits[0, -1]
    return agree / total


def ttft(engine, session) -> float:
    t = time.perf_counter()
    stream = engine.stream_chat(session, GenerationConfig(max_new_tokens=8))
    next(stream, None)
    elapsed = time.perf_counter() - t
    for _ in stream:
        pass
    return elapsed


def conversation_ttfts(engine, turns=8) -> list[float]:
    session = ChatSession()
    times = []
    questions = ["What color is the diamond?", "How many objects are there?", "Is there a red circle?",
                 "What shape is the black object?", "Describe the image.", "Is the square on the left or the right?",
                 "What color is the largest object?", "Is there a blue star?"]
    for k in range(turns):
        session.add_user_message(questions[k % len(questions)], [EXAMPLES / "scene1.png"] if k == 0 else [])
        times.append(ttft(engine, session))
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--quantize", default="auto", help="our engine's weights, as serve.py takes it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="eager decode steps, as `serve.py --no-compile`")
    p.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench"),
                   help="llama.cpp's llama-bench binary for the llama.cpp row (default: $LLAMA_BENCH, then PATH)")
    args = p.parse_args(argv)
    model, processor, runtime = load_for_inference(args.model, quantize=args.quantize,
                                                   compile_decode=not args.no_compile)
    compiled = runtime.decoder
    decode_steps = wait_for_compiled_steps(runtime)  # serve.py decodes eagerly until then; measured: the steady state
    engine = Engine(model, processor, runtime)
    baseline, _ = load_model(args.model, quantize="none", merge_adapter=True)
    plain_llm = baseline.llm  # what a transformers user runs: the LLM with the adapter folded in
    engine_decode_rate(engine, 8)  # warm-up
    ours, base, llama, first, t1, t5, t8 = [], [], [], [], [], [], []
    for _ in range(args.repeats):
        ours.append(engine_decode_rate(engine, args.new_tokens))
        base.append(plain_generate_rate(plain_llm, processor, args.new_tokens))
        llama.append(llama_cpp_rate(processor, args.new_tokens, args.llama_bench))
        s = ChatSession()
        s.add_user_message("What color is the diamond?", [EXAMPLES / "scene1.png"])
        first.append(ttft(engine, s))
        times = conversation_ttfts(engine)
        t1.append(times[0])
        t5.append(times[4])
        t8.append(times[7])
    agreement = token_agreement(model, runtime, plain_llm, processor, args.new_tokens)
    med = statistics.median
    print(json.dumps({
        "benchmark": "chat_speed", "model": args.model, "threads": torch.get_num_threads(),
        "weights": runtime.quantized or "fp32",
        "decode_steps": decode_steps,
        **({"compile_seconds": round(compiled.compile_seconds, 1)} if compiled is not None and compiled.compile_seconds
           else {"compile_error": compiled.error} if compiled is not None and compiled.error else {}),
        "decode_tokens_per_s": round(med(ours), 2), "baseline_generate_tokens_per_s": round(med(base), 2),
        "decode_ratio_vs_generate": round(med(ours) / med(base), 2),
        **({"llama_cpp_tokens_per_s": round(med(llama), 2), "decode_ratio_vs_llama_cpp": round(med(ours) / med(llama), 2),
            "llama_cpp_via": "llama-bench" if args.llama_bench else "llama-cpp-python"}
           if all(isinstance(x, float) for x in llama) else {"llama_cpp": next(x for x in llama if isinstance(x, str))}),
        "token_agreement_with_fp32": round(agreement, 4),
        "ttft_new_image_s": round(med(first), 3), "ttft_turn1_s": round(med(t1), 3), "ttft_turn5_s": round(med(t5), 3),
        "ttft_turn8_s": round(med(t8), 3),
        "ttft_turn8_over_turn1": round(med(t8) / med(t1), 2),
        "runs": {"decode": [round(x, 2) for x in ours], "generate": [round(x, 2) for x in base],
                 "llama_cpp": [round(x, 2) for x in llama if isinstance(x, float)]}}))


if __name__ == "__main__":
    main()
