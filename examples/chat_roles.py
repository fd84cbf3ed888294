"""Chat roles (SGLang README): `system`/`user`/`assistant`, the `with s.user():` block and
`assistant_begin()`/`assistant_end()`. Roles are written with the model's chat template.

    python examples/chat_roles.py [--url http://localhost:30000]
"""

import argparse
import asyncio

import asgl as sgl

MAX_TOKENS = 100


@sgl.function
def chat_example(s):
    s += sgl.system("You are a helpful assistant.")
    # Same as: s += s.system("You are a helpful assistant.")
    with s.user():
        s += "Question: What is the capital of France?"
    s += sgl.assistant_begin()
    s += "Answer: " + sgl.gen(max_tokens=MAX_TOKENS, stop="\n")
    s += sgl.assistant_end()


@sgl.function
async def chat_example_async(s):
    s += s.system("You are a helpful assistant.")
    with s.user():
        s += "Question: What is the capital of France?"
    s += sgl.assistant_begin()
    s += "Answer: "
    answer = await s.gen(max_tokens=MAX_TOKENS, stop="\n")
    s += sgl.assistant_end()
    return answer


def main(url: str) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = chat_example.run()
    print(state.text())
    state = asyncio.run(chat_example_async.arun())
    for m in state.messages():
        print(m["role"], ":", m["content"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    main(parser.parse_args().url)
