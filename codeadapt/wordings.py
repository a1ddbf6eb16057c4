"""How people ask: several wordings per example kind, chosen per example by a seeded hash.

Each kind mixes questions, imperatives and terse requests, with and without the repository's
name, so the wording alone does not pin one template to one call. `{name}` is the symbol,
module or path the question is about; `{repo}` the source's name.
"""

from __future__ import annotations

import random

WORDINGS: dict[str, tuple[str, ...]] = {
    "grep_class": (
        "Where is the class `{name}` defined in {repo}?",
        "Find the definition of class `{name}` in {repo}.",
        "In {repo}, which file defines `class {name}`?",
        "I'm looking for the `{name}` class in {repo}. Where is it?",
        "where's class {name} defined?",
        "Which module declares the `{name}` class?",
        "Locate `class {name}`.",
        "Can you find where `{name}` (a class) lives in {repo}?",
        "What file and line is the `{name}` class on?",
        "class `{name}` - where is it defined?",
    ),
    "grep_function": (
        "Where is the function `{name}` defined in {repo}?",
        "Find `def {name}` in {repo}.",
        "Which file of {repo} defines the `{name}` function?",
        "Locate the `{name}` function in the {repo} code base.",
        "where is {name}() defined?",
        "In which module is `{name}` implemented as a function?",
        "Point me to the definition of `{name}`.",
        "What file and line define the function `{name}`?",
        "find function {name}",
        "Where does {repo} define `{name}`?",
    ),
    "grep_subclasses": (
        "Which classes in {repo} subclass `{name}`?",
        "List the subclasses of `{name}` in {repo}.",
        "What classes derive from `{name}` in {repo}?",
        "Which classes inherit from `{name}`?",
        "Find every class whose bases include `{name}`.",
        "subclasses of {name}?",
        "What extends `{name}` in this repository?",
        "Show me the classes that have `{name}` as a base class.",
    ),
    "grep_decorator": (
        "Where is the `@{name}` decorator used in {repo}?",
        "Find every use of `@{name}` in {repo}.",
        "Which definitions in {repo} are decorated with `@{name}`?",
        "List the places that apply `@{name}`.",
        "where is @{name} used?",
        "Which functions or classes carry the `@{name}` decorator?",
        "How many times is `@{name}` applied in {repo}, and where?",
        "Find the `@{name}` decorations.",
    ),
    "grep_importers": (
        "Which files in {repo} import `{name}`?",
        "Find the modules of {repo} that import from `{name}`.",
        "Who imports `{name}` in {repo}?",
        "Which modules depend on `{name}` through an import?",
        "list files importing {name}",
        "Where is `{name}` imported?",
        "What imports `{name}` in this code base?",
        "Show me every file with an import of `{name}`.",
    ),
    "grep_async": (
        "Which async functions are defined in `{name}` in {repo}?",
        "List the `async def`s in {repo}'s `{name}`.",
        "What coroutines does `{name}` define in {repo}?",
        "Find the coroutine functions in `{name}`.",
        "async defs in {name}?",
        "Which functions in `{name}` are `async`?",
        "Show me the async functions of `{name}`.",
        "What does `{name}` define with `async def`?",
    ),
    "read_class": (
        "Show me the class `{name}` in {repo}.",
        "Can you show the source of `{name}` from {repo}?",
        "I want to read the implementation of class `{name}` in {repo}.",
        "Print the code of the `{name}` class.",
        "show class {name}",
        "What does the `{name}` class look like in {repo}? Show the code.",
        "Let me see how `{name}` is written.",
        "Open the definition of class `{name}` for me.",
    ),
    "read_function": (
        "Show me the function `{name}` in {repo}.",
        "What does the source of `{name}` in {repo} look like?",
        "Read me the implementation of `{name}` in {repo}.",
        "Print the code of the function `{name}`.",
        "show me {name}()",
        "How is `{name}` implemented? Show the code.",
        "Let me see the body of `{name}`.",
        "Open `def {name}` for me.",
    ),
    "read_method": (
        "Show me the method `{name}` in {repo}.",
        "How is `{name}` implemented in {repo}? Show me the code.",
        "Let me see the source of the `{name}` method in {repo}.",
        "Print the code of the method `{name}`.",
        "show {name}",
        "What does the code of `{name}` look like?",
        "Open the `{name}` method for me.",
        "I'd like to read `{name}` from {repo}.",
    ),
    "explain_symbol": (
        "What does `{name}` in {repo} do?",
        "Briefly, what is `{name}` for in {repo}?",
        "Explain the purpose of `{name}` in {repo}.",
        "What is `{name}` used for?",
        "what does {name} do",
        "Tell me what `{name}` is in {repo}.",
        "Summarise `{name}` for me.",
        "Can you explain `{name}`?",
    ),
}


TEST_ONLY = 3  # the last wordings of each kind are reserved for test examples


def pick(kind: str, rng: random.Random, test: bool = False, **fields: str) -> str:
    """One wording of `kind` filled with `fields`: from the last `TEST_ONLY` wordings for a
    test example, from the others for train and valid ones."""
    options = WORDINGS[kind]
    options = options[-TEST_ONLY:] if test else options[:-TEST_ONLY]
    return rng.choice(options).format(**fields)
