"""Multi-turn chat, the quick start of SGLang's README, on an asgl server.

    asgl serve &                       # http://localhost:30000
    python examples/quick_start.py [--url http://localhost:30000]

Both forms: the classic one (`s += assistant(gen(...))`, `fn.run`) and an `async def`
program that awaits each answer.
"""

import argparse
import asyncio

from asgl import RuntimeEndpoint, assistant, function, gen, set_default_backend, system, user

MAX_TOKENS = 256


@function
def multi_turn_question(s, question_1, question_2):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=MAX_TOKENS))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=MAX_TOKENS))


@function
async def multi_turn_question_async(s, question_1, question_2):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    with s.assistant():
        await s.gen("answer_1", max_tokens=MAX_TOKENS)
    s += user(question_2)
    with s.assistant():
        await s.gen("answer_2", max_tokens=MAX_TOKENS)


QUESTIONS = dict(question_1="What is the capital of the United States?",
                 question_2="List two local attractions.")


def main(url: str) -> None:
    set_default_backend(RuntimeEndpoint(url))

    state = multi_turn_question.run(**QUESTIONS)
    for m in state.messages():
        print(m["role"], ":", m["content"])
    print(state["answer_1"])

    state = asyncio.run(multi_turn_question_async.arun(**QUESTIONS))
    print("async:", state["answer_2"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    main(parser.parse_args().url)
