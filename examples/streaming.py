"""Streaming with `stream=True` (SGLang README): print the text as it is generated.

    python examples/streaming.py [--url http://localhost:30000]
"""

import argparse
import asyncio

import asgl as sgl
from run_batch import text_qa, text_qa_async


def stream_sync() -> str:
    state = text_qa.run(
        question="What is the capital of France?",
        temperature=0.1,
        stream=True
    )
    pieces = []
    for out in state.text_iter():
        print(out, end="", flush=True)
        pieces.append(out)
    print()
    return "".join(pieces)


async def stream_async() -> str:
    state = await text_qa_async.arun(question="What is the capital of France?",
                                     temperature=0.1, stream=True)
    pieces = []
    async for out in state:
        print(out, end="", flush=True)
        pieces.append(out)
    print()
    return "".join(pieces)


def main(url: str) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    stream_sync()
    asyncio.run(stream_async())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    main(parser.parse_args().url)
