"""Regular expressions as decoding constraints (SGLang README): an IP address, and a
character sheet in JSON. Needs a server with constrained decoding (`regex`).

    python examples/regex_constraints.py [--url http://localhost:30000]
"""

import argparse
import asyncio

import asgl as sgl

MAX_TOKENS = 256
IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"

character_regex = (
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


@sgl.function
def regular_expression_gen(s):
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: " + sgl.gen(
        "answer",
        temperature=0,
        regex=IP_REGEX,
    )


@sgl.function
def character_gen(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += sgl.gen("json_output", max_tokens=MAX_TOKENS, regex=character_regex)


@sgl.function
async def regular_expression_gen_async(s):
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: "
    await s.gen("answer", temperature=0, regex=IP_REGEX)


@sgl.function
async def character_gen_async(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    await s.gen("json_output", max_tokens=MAX_TOKENS, regex=character_regex)


def main(url: str) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    print(regular_expression_gen.run()["answer"])
    print(character_gen.run(name="Hermione Granger")["json_output"])
    print(asyncio.run(character_gen_async.arun(name="Harry Potter"))["json_output"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:30000")
    main(parser.parse_args().url)
