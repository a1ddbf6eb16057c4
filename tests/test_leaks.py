"""Decontamination on content: reworded questions with the same calls and results leak."""

from codeadapt import chat
from codeadapt.leaks import content_leaks


def _conv(question: str, pattern: str, result: str, answer: str) -> list[dict]:
    return [chat.system("structlog"), chat.user(question),
            chat.tool_call("call_1", "grep", {"pattern": pattern, "glob": "*.py"}),
            chat.tool_result("call_1", "grep", result), chat.assistant(answer)]


RESULT = "\n".join(f"structlog/x{i}.py:{10 * i}:class Logger{i}(BoundLoggerBase):" for i in range(6))


def test_reworded_question_with_the_same_call_and_result_is_an_exact_leak() -> None:
    train = [_conv("List the subclasses of `BoundLoggerBase` in structlog.", r"^\s*class \w+\(.*\bBoundLoggerBase\b",
                   RESULT, "6 classes subclass it.")]
    held = {"t1": _conv("Which classes in structlog subclass `BoundLoggerBase`?",
                        r"^\s*class \w+\(.*\bBoundLoggerBase\b", RESULT, "Six classes do."),
            "t2": _conv("Which classes subclass `Other`?", r"^\s*class \w+\(.*\bOther\b",
                        "structlog/y.py:3:class A(Other):", "One.")}
    assert content_leaks(held, train) == {"t1": "exact"}


def test_near_duplicate_results_leak_and_direct_answers_are_not_compared() -> None:
    train = [_conv("q", r"^\s*class \w+\(.*\bBoundLoggerBase\b", RESULT, "a")]
    near = RESULT + "\nstructlog/x9.py:90:class Logger9(BoundLoggerBase):"
    held = {"near": _conv("q2", r"^\s*class \w+\(.*\bBoundLoggerBase\b", near, "b"),
            "direct": [chat.system("s"), chat.user("q"), chat.assistant("a")]}
    assert content_leaks(held, train) == {"near": "near"}
