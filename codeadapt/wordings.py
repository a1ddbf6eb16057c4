"""How people ask: several wordings per example kind, chosen per example by a seeded hash.

Each kind mixes questions, imperatives and terse requests, with and without the repository's
name, so the wording alone does not pin one template to one call. `{name}` is the symbol,
module or path the question is about; `{repo}` the source's name.
"""

from __future__ import annotations

import random
import re

WORDINGS: dict[str, tuple[str, ...]] = {
    "grep_class": (
        "Where is the class `{name}` defined in {repo}?",
        "Find the definition of class `{name}` in {repo}.",
        "In {repo}, which file defines `class {name}`?",
        "I'm looking for the `{name}` class in {repo}. Where is it?",
        "where's class {name} defined?",
        "Which module declares the `{name}` class?",
        "Locate `class {name}`.",
        "Find class {name} in {repo}, please.",
        "{repo}: where's `{name}` declared?",
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
        "I need the function `{name}`; which file has it?",
        "where's def {name} in {repo}",
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
        "Does anything in {repo} subclass `{name}`? List them.",
        "Find the classes deriving from `{name}`.",
        "Which classes are built on `{name}` in {repo}?",
        "children of class {name} in {repo}",
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
        "Show me where {repo} applies `@{name}`.",
        "Which defs use the `@{name}` decorator?",
        "@{name} usages in {repo}",
        "I'd like to see every place decorated with `@{name}`.",
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
        "Which modules of {repo} have `import {name}` or `from {name} import`?",
        "I need every file in {repo} that imports `{name}`.",
        "files that import {name}?",
        "Give me the importers of `{name}`.",
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
        "List the coroutines in `{name}`.",
        "{repo}'s `{name}`: which functions are async?",
        "async functions in {name} please",
        "Find `async def` in `{name}`.",
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
        "Display the source of class `{name}` in {repo}.",
        "I'd like to see the code of `{name}` (a class).",
        "can you print class {name} from {repo}",
        "Read class `{name}` and show it to me.",
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
        "Display the code of `{name}` in {repo}.",
        "I'd like to read the function `{name}`.",
        "print {name} from {repo}",
        "Can you pull up `{name}` and show me its code?",
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
        "Display the method `{name}` from {repo}.",
        "Can you show me how `{name}` is written?",
        "print method {name}",
        "I want to see the code of `{name}`.",
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
        "What's the role of `{name}` in {repo}?",
        "I'm not sure what `{name}` does - can you check?",
        "explain {name} in {repo}",
        "What is the job of `{name}`?",
        "Tell me what `{name}` is in {repo}.",
        "Summarise `{name}` for me.",
        "Can you explain `{name}`?",
    ),
}

# A definition described by what it does (its docstring's first sentence), not by its name:
# `{did}` is that sentence with the verb in the base form ("parse the request body"), `{does}`
# in the third person ("parses the request body"). The model has to choose search terms.
WORDINGS["find_behaviour"] = (
    "Where does {repo} {did}?",
    "Which function in {repo} {does}?",
    "Find the code that {does}.",
    "I need the part of {repo} that {does}. Where is it?",
    "where is the code that {does}",
    "Which definition {does}?",
    "Is there something in {repo} that {does}? Where?",
    "{repo}: where do we {did}?",
    "Point me to whatever {does}.",
    "What in {repo} {does}?",
    "Where's the logic to {did}?",
    "Something here should {did} - which file and line?",
)

# Follow-ups after "show me X" (the code is on screen): answered from that read, no new call.
WORDINGS["followup_params"] = (
    "What parameters does it take?",
    "Which arguments does it accept?",
    "What are its arguments?",
    "and its parameters?",
    "What do I pass to it?",
    "Which parameters are in its signature?",
    "What does it take as input?",
    "List its parameters.",
    "what args does it have",
    "Which arguments can I give it?",
    "What goes in its parameter list?",
    "And what are the parameters?",
)
WORDINGS["followup_decorated"] = (
    "Is it decorated?",
    "Does it have any decorators?",
    "Any decorators on it?",
    "Is there a decorator on that definition?",
    "is it wrapped in a decorator",
    "Which decorators does it use, if any?",
    "Does anything decorate it?",
    "Has it got a decorator?",
    "does it carry a decorator?",
    "Is a decorator applied to it?",
    "Are there decorators above it?",
    "Tell me whether it is decorated.",
)

# A follow-up after "where is X defined?": X is the one just found (no name needed).
WORDINGS["followup_read"] = (
    "Show me its code.",
    "Can you show me the code?",
    "And how is it implemented?",
    "ok, show it",
    "Let me see the source.",
    "Open it, please.",
    "What does its code look like?",
    "Print it for me.",
    "show me the implementation",
    "Great - can I see the code?",
    "Could you display it?",
    "Now read it to me.",
)

# HTML kinds: `{path}` is the page, `{ref}` a table reference or a pasted snippet.
WORDINGS.update({
    "html_unlabeled_inputs": (
        "Which form fields in {path} have no label?",
        "Would a screen reader announce any input in {path} unlabeled?",
        "Check {path}: does every form control have an accessible label?",
        "List the unlabeled form controls in {path}.",
        "are all inputs in {path} labelled?",
        "Find inputs without a <label> in {path}.",
        "Do the form controls of {path} have labels?",
        "Which inputs on {path} lack an accessible name?",
        "Audit the labels of the form fields in {path}.",
        "{path}: any form fields missing labels?",
    ),
    "html_form_fields": (
        "What fields does the form in {path} collect?",
        "List the form fields in {path} with their types and required flags.",
        "Which inputs in {path} are required, and what types are they?",
        "What does the form on {path} ask the user for?",
        "form fields in {path}?",
        "Describe the inputs of the form in {path}.",
        "Give me the fields of {path}'s form, with types.",
        "What data does {path} collect through its form?",
        "Enumerate the form controls in {path}.",
        "Which fields make up the form in {path}?",
    ),
    "html_missing_alt": (
        "Which images in {path} are missing alt text?",
        "Do all the <img> elements in {path} have alt attributes?",
        "Find images without alternative text in {path}.",
        "any images without alt in {path}?",
        "Check the alt text of the images in {path}.",
        "Which <img> tags in {path} lack an alt attribute?",
        "Are the images of {path} accessible to screen readers?",
        "List the images in {path} that have no alt text.",
        "Is alt text missing anywhere in {path}?",
        "{path}: do the images have alt attributes?",
    ),
    "html_table_headers": (
        "Does {ref} in {path} have a caption and header cells with scope?",
        "Is {ref} in {path} accessible (caption, <th>, scope)?",
        "Check the headers of {ref} in {path}.",
        "Does {ref} of {path} use <th> with scope?",
        "table headers of {ref} in {path}?",
        "Review {ref} in {path} for a caption and proper header cells.",
        "Would a screen reader understand {ref} in {path}?",
        "Are the header cells of {ref} in {path} marked up correctly?",
        "Check {ref} in {path}: caption, th, scope?",
        "How accessible is {ref} in {path}?",
    ),
    "html_heading_outline": (
        "Does the heading structure in {path} skip any levels?",
        "Show me the heading outline of {path} and point out skipped levels.",
        "Are the headings in {path} nested correctly?",
        "heading levels in {path} ok?",
        "Check the h1-h6 hierarchy of {path}.",
        "What is the heading outline of {path}?",
        "Does {path} jump heading levels anywhere?",
        "List the headings of {path} and any skipped levels.",
        "Is the document outline of {path} well formed?",
        "Review the headings in {path}.",
    ),
    "html_landmarks": (
        "What landmark regions does {path} define?",
        "Does {path} have a main landmark, and which other landmarks are there?",
        "List the page regions (banner, navigation, main, ...) in {path}.",
        "landmarks in {path}?",
        "Which ARIA landmarks does {path} have?",
        "Check {path} for header, nav, main and footer regions.",
        "How is {path} divided into landmark regions?",
        "Which landmark regions can a screen reader jump to in {path}?",
        "Does {path} mark up its regions with landmarks?",
        "Give me the landmarks of {path}.",
    ),
    "html_vague_links": (
        'Are there links in {path} with vague text like "click here"?',
        "Which links in {path} would not make sense out of context?",
        "Check the link texts in {path} for accessibility problems.",
        "vague link texts in {path}?",
        "Do any links in {path} say only \"read more\" or \"here\"?",
        "Find links in {path} whose text does not say where they go.",
        "Review the link text of {path}.",
        "Are the links in {path} descriptive?",
        "Which anchors in {path} have unclear text?",
        "Is any link text in {path} too generic?",
    ),
    "html_button_names": (
        "Which buttons in {path} have no accessible name?",
        "Do all buttons in {path} have a name a screen reader can announce?",
        "Find icon-only buttons without a label in {path}.",
        "unnamed buttons in {path}?",
        "Check the buttons of {path} for accessible names.",
        "Which <button>s in {path} lack text or aria-label?",
        "Are there buttons in {path} a screen reader cannot name?",
        "List the buttons in {path} without a label.",
        "Do the buttons in {path} have names?",
        "{path}: any buttons without an accessible name?",
    ),
    "html_lang": (
        "Does {path} declare the page language?",
        "Is there a lang attribute on the <html> element of {path}?",
        "What language is {path} declared to be in?",
        "lang attribute in {path}?",
        "Check whether {path} sets a document language.",
        "Which language does the <html> tag of {path} declare?",
        "Is the page language of {path} specified?",
        "Does the html element in {path} have lang?",
        "What lang does {path} use?",
        "Has {path} got a lang attribute?",
    ),
    "html_tabindex": (
        "Does anything in {path} use a positive tabindex?",
        "Check {path} for tabindex values that change the tab order.",
        "Which elements in {path} have a tabindex, and is any of them a problem?",
        "tabindex problems in {path}?",
        "Is the tab order of {path} changed by tabindex?",
        "Find tabindex attributes in {path}.",
        "Are there positive tabindex values in {path}?",
        "Review the tabindex use in {path}.",
        "Does {path} override the natural tab order?",
        "Which elements of {path} set tabindex?",
    ),
    "html_direct_required": (
        "Here is a form from {path}:\n\n{ref}\n\nWhich fields are required?",
        "Which fields of this form (from {path}) must be filled in?\n\n{ref}",
        "{ref}\n\nThis is from {path}. What does the user have to fill in?",
        "From {path}:\n\n{ref}\n\nWhat is mandatory here?",
        "{ref}\n\nrequired fields? (from {path})",
        "Which inputs are required in this snippet of {path}?\n\n{ref}",
        "Look at this form from {path}:\n\n{ref}\n\nWhat must be filled in before it submits?",
        "{ref}\n\nIn this form from {path}, which fields can't be left empty?",
        "This is part of {path}:\n\n{ref}\n\nList the required fields.",
        "What are the required fields of the form below ({path})?\n\n{ref}",
    ),
})


TEST_ONLY = 3  # the last wordings of each kind are reserved for test examples
TYPO_RATE = 0.05  # people mistype: this share of questions has two letters of a word swapped
_TOKEN = re.compile(r"\{[^}]*\}|`[^`]*`|<[^>]*>|[A-Za-z]{4,}")


def typo(template: str, rng: random.Random) -> str:
    """`template` with two adjacent letters of one plain word swapped (never inside a
    placeholder, a code span or a tag, so names stay exact); unchanged when it has none."""
    words = [m for m in _TOKEN.finditer(template) if m.group()[0] not in "{`<"]
    if not words:
        return template
    m = rng.choice(words)
    w = m.group()
    i = rng.randrange(1, len(w) - 2)  # keep the first letter, as most typos do
    if w[i] == w[i + 1]:
        return template
    return template[: m.start() + i] + w[i + 1] + w[i] + template[m.start() + i + 2 :]


def pick(kind: str, rng: random.Random, test: bool = False, **fields: str) -> str:
    """One wording of `kind` filled with `fields`: from the last `TEST_ONLY` wordings for a
    test example, from the others for train and valid ones; `TYPO_RATE` of them mistyped."""
    options = WORDINGS[kind]
    options = options[-TEST_ONLY:] if test else options[:-TEST_ONLY]
    template = rng.choice(options)
    if rng.random() < TYPO_RATE:
        template = typo(template, rng)
    return template.format(**fields)
