"""An image as input (SGLang README). It needs a vision model (docs/vision.md: LLaVA 1.5
served with e.g. `--chat-template vicuna_v1.1`); on a text model the request fails with a
clear error (HTTP 400 from the server, or NotImplementedError from the in-process Runtime).
OpenAI and Anthropic vision models work too.

    python examples/image_qa.py [--url http://localhost:30000] [--image cat.png]
"""

import argparse
import base64

import asgl as sgl

MAX_TOKENS = 256
# A 1x1 PNG, so the example runs without an image file.
TINY_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8"
                            "BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


@sgl.function
def image_qa(s, image_file, question):
    s += sgl.user(sgl.image(image_file) + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=MAX_TOKENS))


@sgl.function
async def image_qa_async(s, image_file, question):
    s += sgl.user(sgl.image(image_file) + question)
    with s.assistant():
        await s.gen("answer", max_tokens=MAX_TOKENS)


def main(url: str, image_file) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    for program in (image_qa, image_qa_async):
        try:
            state = program.run(image_file=image_file, question="What is in this image?")
            print(state["answer"])
        except (sgl.BackendError, NotImplementedError) as e:
            print(f"{program.__name__}: {e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    parser.add_argument("--image", default=None, help="an image file (default: a tiny PNG)")
    args = parser.parse_args()
    main(args.url, args.image or TINY_PNG)
