"""A batch of programs with `run_batch` (SGLang README): all are sent at once, so the
server batches them continuously; a progress bar follows them.

    python examples/run_batch.py [--url http://localhost:30000]
"""

import argparse
import asyncio

import asgl as sgl


@sgl.function
def text_qa(s, question):
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n")


@sgl.function
async def text_qa_async(s, question):
    s += "Q: " + question + "\n"
    s += "A:"
    return await s.gen("answer", stop="\n")


QUESTIONS = [
    {"question": "What is the capital of the United Kingdom?"},
    {"question": "What is the capital of France?"},
    {"question": "What is the capital of Japan?"},
]


def main(url: str) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    states = text_qa.run_batch(QUESTIONS, progress_bar=True)
    for state in states:
        print(state["answer"])
    states = asyncio.run(text_qa_async.arun_batch(QUESTIONS, progress_bar=True,
                                                  max_concurrency=2))
    print([state.ret_value for state in states])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    main(parser.parse_args().url)
