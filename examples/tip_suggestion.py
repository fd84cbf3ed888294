"""Parallel prompts with `fork` (SGLang README): both tips are expanded at once, and the
server computes their shared prefix once (it is cached before the branches run).

    python examples/tip_suggestion.py [--url http://localhost:30000]
"""

import argparse
import asyncio

import asgl as sgl

MAX_TOKENS = 256


@sgl.function
def tip_suggestion(s):
    s += (
        "Here are two tips for staying healthy: "
        "1. Balanced Diet. 2. Regular Exercise.\n\n"
    )
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i+1} into a paragraph:\n"
        f += sgl.gen(f"detailed_tip", max_tokens=MAX_TOKENS, stop="\n\n")
    s += "Tip 1:" + forks[0]["detailed_tip"] + "\n"
    s += "Tip 2:" + forks[1]["detailed_tip"] + "\n"
    s += "In summary" + sgl.gen("summary")
    return forks


@sgl.function
async def tip_suggestion_async(s):
    s += (
        "Here are two tips for staying healthy: "
        "1. Balanced Diet. 2. Regular Exercise.\n\n"
    )
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i+1} into a paragraph:\n"
    tips = await asyncio.gather(*(f.gen("detailed_tip", max_tokens=MAX_TOKENS, stop="\n\n")
                                  for f in forks))
    s += "Tip 1:" + tips[0] + "\n"
    s += "Tip 2:" + tips[1] + "\n"
    s += "In summary"
    await s.gen("summary")
    return forks


def main(url: str) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = tip_suggestion.run()
    print(state.text())
    state = asyncio.run(tip_suggestion_async.arun())
    for branch in state.ret_value:
        print("branch cached tokens:", branch.get_meta_info("detailed_tip")["cached_tokens"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    main(parser.parse_args().url)
