"""Constrained decoding throughput: grammar overhead and jump-forward.

    python bench/json_decode.py [--batch 1,8] [--out results.jsonl] [any engine option]

Three comparisons on the same model and prompts, greedy, each engine in this process:

- overhead: a JSON schema (a person record) decoded with its grammar (jump-forward off,
  so every token is sampled under a mask), against the same prompts decoded without a
  grammar for exactly the same number of tokens (ignore_eos, per-request max_new_tokens):
  the difference is the cost of masks, matchers and their hand-off to the sampler.
- jump-forward on SGLang README's character regex (long fixed keys between short free
  fields): on vs off, output tokens per second of wall time and forward steps.
- jump-forward on a JSON schema with long property names, on vs off.

Figures: wall seconds for the batch (all submitted at once), output tokens / s, steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.workloads import append_record  # noqa: E402

CHARACTER_REGEX = (
    r"""\{\n"""
    + r"""    "name": "[\w\d\s]{1,16}",\n"""
    + r"""    "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)",\n"""
    + r"""    "blood status": "(Pure-blood|Half-blood|Muggle-born)",\n"""
    + r"""    "occupation": "(student|teacher|auror|ministry of magic|death eater|order of the phoenix)",\n"""
    + r"""    "wand": \{\n"""
    + r"""        "wood": "[\w\d\s]{1,16}",\n"""
    + r"""        "core": "[\w\d\s]{1,16}",\n"""
    + r"""        "length": [0-9]{1,2}\.[0-9]{0,2}\n"""
    + r"""    \},\n"""
    + r"""    "alive": "(Alive|Deceased)",\n"""
    + r"""    "patronus": "[\w\d\s]{1,16}",\n"""
    + r"""    "bogart": "[\w\d\s]{1,16}"\n"""
    + r"""\}"""
)
NAMES = ["Harry Potter", "Hermione Granger", "Ron Weasley", "Severus Snape", "Draco Malfoy",
         "Albus Dumbledore", "Rubeus Hagrid", "Minerva McGonagall", "Sirius Black",
         "Luna Lovegood", "Neville Longbottom", "Ginny Weasley", "Remus Lupin",
         "Dolores Umbridge", "Cedric Diggory", "Bellatrix Lestrange"]
PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 20},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"]}
LONG_KEYS_SCHEMA = {"type": "object", "properties": {
    "full_legal_name_of_the_person": {"type": "string", "maxLength": 20},
    "year_of_birth_in_the_gregorian_calendar": {"type": "integer", "minimum": 1900,
                                                "maximum": 2025},
    "primary_residence_city_and_country": {"type": "string", "maxLength": 24},
    "is_currently_employed_full_time": {"type": "boolean"}},
    "required": ["full_legal_name_of_the_person", "year_of_birth_in_the_gregorian_calendar",
                 "primary_residence_city_and_country", "is_currently_employed_full_time"]}


def character_prompts(n: int) -> list[str]:
    return [f"{NAMES[i % len(NAMES)]} is a character in Harry Potter. Please fill in the "
            f"following information about this character.\n" for i in range(n)]


def person_prompts(n: int) -> list[str]:
    return [f"Describe {NAMES[i % len(NAMES)]} as a JSON record.\n" for i in range(n)]


def _valid(text: str, sp: dict) -> bool:
    """Does a stopped output satisfy its grammar? (regex: full match; schema: its
    required keys are there.)"""
    if "regex" in sp:
        return re.fullmatch(sp["regex"], text) is not None
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(json.loads(sp["json_schema"])["required"]) <= set(value)


async def run_batch(engine, prompts: list[str], params: list[dict]) -> dict:
    steps = engine.scheduler.stats.num_steps
    gpu = engine.runner.gpu_stats if engine.runner.on_cuda else None
    if gpu is not None:
        gpu.reset()
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(p, sp) for p, sp in zip(prompts, params)))
    wall = time.perf_counter() - t0
    tokens = sum(len(o.output_ids) for o in outs)
    return {"wall_s": round(wall, 3), "output_tokens": tokens,
            "tok_per_s": round(tokens / wall, 1),
            "steps": engine.scheduler.stats.num_steps - steps,
            "stopped": sum(o.finish_reason["type"] == "stop" for o in outs),
            "valid": sum(o.finish_reason["type"] == "stop" and _valid(o.text, sp)
                         for o, sp in zip(outs, params) if "regex" in sp or "json_schema" in sp),
            "lengths": [len(o.output_ids) for o in outs], "outs": outs,
            "gpu": {k: v for k, v in gpu.summary().items()
                    if k in ("extend_steps", "extend_graph_steps", "graph_share",
                             "gpu_idle_share")} if gpu is not None else {}}


async def with_engine(options: dict, fn):
    from asgl.engine.loop.engine import Engine

    engine = Engine(**options)
    await engine.start()
    try:
        await engine.generate("warm up", {"max_new_tokens": 4, "regex": "[a-z]{4}"})
        return await fn(engine)
    finally:
        await engine.shutdown()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best kept)")
    args, rest = parser.parse_known_args()
    from asgl.config import EngineConfig

    base = EngineConfig.from_cli(rest, prog="json_decode.py")
    batches = [int(b) for b in args.batch.split(",")]

    async def best(engine, prompts, params):
        # warm-up on the whole batch: grammars compile (and are cached), kernels see this
        # batch size, all outside the timed runs
        await asyncio.gather(*(engine.generate(p, {**sp, "max_new_tokens": 4})
                               for p, sp in zip(prompts, params)))
        runs = [await run_batch(engine, prompts, params) for _ in range(args.repeat)]
        return min(runs, key=lambda r: r["wall_s"])

    # 1. overhead: grammar (no jump-forward) vs the same token counts unconstrained
    async def overhead(engine):
        rows = []
        for b in batches:
            prompts = person_prompts(b)
            schema = {"temperature": 0, "max_new_tokens": 160,
                      "json_schema": json.dumps(PERSON_SCHEMA)}
            constrained = await best(engine, prompts, [schema] * b)
            free = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
                    for n in constrained["lengths"]]
            unconstrained = await best(engine, prompts, free)
            assert unconstrained["lengths"] == constrained["lengths"]
            rows.append((b, constrained, unconstrained))
        return rows

    no_jump = base.replace(disable_jump_forward=True)
    for b, con, free in await with_engine({"config": no_jump}, overhead):
        cost = free["tok_per_s"] / con["tok_per_s"] - 1
        append_record(args.out, {
            "bench": "json_decode", "case": "grammar_overhead", "batch": b,
            "constrained_tok_s": con["tok_per_s"], "unconstrained_tok_s": free["tok_per_s"],
            "constrained_wall_s": con["wall_s"], "unconstrained_wall_s": free["wall_s"],
            "output_tokens": con["output_tokens"], "stopped": con["stopped"],
            "valid": con["valid"],
            "overhead": round(cost, 3), "gpu_constrained": con["gpu"],
            "gpu_unconstrained": free["gpu"]})

    # 2./3. jump-forward on vs off
    cases = [("character_regex", character_prompts,
              {"temperature": 0, "max_new_tokens": 256, "regex": CHARACTER_REGEX}),
             ("long_keys_schema", person_prompts,
              {"temperature": 0, "max_new_tokens": 200,
               "json_schema": json.dumps(LONG_KEYS_SCHEMA)})]

    async def jump_cases(engine):
        return {(name, b): await best(engine, make(b), [sp] * b)
                for name, make, sp in cases for b in batches}

    on = await with_engine({"config": base.replace(disable_jump_forward=False)}, jump_cases)
    off = await with_engine({"config": no_jump}, jump_cases)
    for (name, b), r_on in on.items():
        r_off = off[(name, b)]
        same = [o.text for o in r_on["outs"]] == [o.text for o in r_off["outs"]]
        append_record(args.out, {
            "bench": "json_decode", "case": f"jump_forward_{name}", "batch": b,
            "on_wall_s": r_on["wall_s"], "off_wall_s": r_off["wall_s"],
            "on_steps": r_on["steps"], "off_steps": r_off["steps"],
            "on_output_tokens": r_on["output_tokens"],
            "off_output_tokens": r_off["output_tokens"],
            "speedup": round(r_off["wall_s"] / r_on["wall_s"], 2),
            "same_text": same, "stopped_on": r_on["stopped"], "stopped_off": r_off["stopped"],
            "valid_on": r_on["valid"], "valid_off": r_off["valid"],
            "gpu_on": r_on["gpu"], "gpu_off": r_off["gpu"]})


if __name__ == "__main__":
    asyncio.run(main())
