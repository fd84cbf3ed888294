"""Tool use with `choices` (SGLang README): the model picks a tool, the program branches.

    python examples/tool_use.py [--url http://localhost:30000]
"""

import argparse
import asyncio

import asgl as sgl


@sgl.function
def tool_use(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + sgl.gen("tool", choices=["calculator", "search engine"]) + ". "
    if s["tool"] == "calculator":
        s += "The math expression is" + sgl.gen("expression")
    elif s["tool"] == "search engine":
        s += "The key word to search is" + sgl.gen("word")


@sgl.function
async def tool_use_async(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a "
    tool = await s.select("tool", choices=["calculator", "search engine"])
    s += ". "
    if tool == "calculator":
        s += "The math expression is"
        await s.gen("expression")
    elif tool == "search engine":
        s += "The key word to search is"
        await s.gen("word")


def main(url: str) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = tool_use.run(question="What is the capital of the United States?")
    print(state.text())
    state = asyncio.run(tool_use_async.arun(question="What is 21 * 2?", temperature=0))
    print(state.text())
    print(state.get_meta_info("tool"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    main(parser.parse_args().url)
