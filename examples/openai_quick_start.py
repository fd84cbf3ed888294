"""Multi-turn chat on an OpenAI-compatible API: OpenAI itself (OPENAI_API_KEY), or asgl's
own `/v1` (`--base-url http://localhost:30000/v1 --model default`).

    python examples/openai_quick_start.py --base-url http://localhost:30000/v1
"""

import argparse
import asyncio

from asgl import OpenAI, set_default_backend
from quick_start import QUESTIONS, multi_turn_question, multi_turn_question_async


def main(model: str, base_url: str | None) -> None:
    set_default_backend(OpenAI(model, base_url=base_url))

    state = multi_turn_question.run(**QUESTIONS)
    for m in state.messages():
        print(m["role"], ":", m["content"])
    print(state["answer_1"])

    state = asyncio.run(multi_turn_question_async.arun(**QUESTIONS))
    print("async:", state["answer_2"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default=None, help="default: OpenAI's API")
    parser.add_argument("--model", default=None,
                        help="default: gpt-3.5-turbo on OpenAI, 'default' elsewhere")
    args = parser.parse_args()
    main(args.model or ("default" if args.base_url else "gpt-3.5-turbo"), args.base_url)
