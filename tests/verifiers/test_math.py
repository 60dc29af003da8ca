"""MathVerifier on a table of (gold, response, expected score) across the formats models
write and the known exploits."""

import pytest

from selfevolve.types import Task
from selfevolve.verifiers import MathVerifier
from selfevolve.verifiers.math import boxed, extract_final_answers

FINAL = "Final Answer: The final answer is ${}$. I hope it is correct."

TABLE = [
    # \boxed{}
    ("42", r"So the total is \boxed{42}.", 1),
    ("42", r"\boxed{41}", 0),
    ("\\frac{1}{2}", r"\boxed{\frac{1}{2}}", 1),
    ("\\frac{1}{2}", r"\boxed{0.5}", 1),
    ("\\frac{1}{2}", r"\boxed{\dfrac{2}{4}}", 1),
    ("\\sqrt{2}", r"\boxed{\sqrt{2}}", 1),
    ("\\sqrt{2}", r"\boxed{2^{1/2}}", 1),
    ("\\sqrt{2}", r"\boxed{1.41}", 0),
    ("3\\pi", r"\boxed{3\pi}", 1),
    ("\\frac{\\pi}{2}", r"\boxed{\frac{\pi}{2}}", 1),
    ("x^2+2x+1", r"\boxed{(x+1)^2}", 1),
    ("x^2+1", r"\boxed{(x+1)^2}", 0),
    ("(1, 2)", r"\boxed{(1,2)}", 1),
    ("(1, 2)", r"\boxed{(2,1)}", 0),
    ("10", r"\boxed{10.0}", 1),
    ("-3", r"\boxed{-3}", 1),
    ("-3", r"\boxed{3}", 0),
    ("1000", r"\boxed{1,000}", 1),
    ("0.25", r"\boxed{\frac14}", 1),
    ("2", r"\boxed{\frac{4}{2}}", 1),
    # GSM8K ####
    ("18", "Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", 1),
    ("18", "#### 17", 0),
    ("72", "48/2 = 24\n48+24 = 72\n#### 72", 1),
    ("5", "#### 5.0", 1),
    ("1200", "#### 1,200", 1),
    ("3", "#### -3", 0),
    # SCoRe's format
    ("7", FINAL.format("7"), 1),
    ("7", FINAL.format("8"), 0),
    ("\\frac{3}{4}", FINAL.format("\\frac{3}{4}"), 1),
    ("\\frac{3}{4}", FINAL.format("0.75"), 1),
    ("\\frac{3}{4}", FINAL.format("\\frac{4}{3}"), 0),
    ("2\\sqrt{3}", FINAL.format("\\sqrt{12}"), 1),
    ("12", FINAL.format("12"), 1),
    ("-1", FINAL.format("-1"), 1),
    # "The answer is X"
    ("12", "7 + 8 = 15. 15 - 3 = 12. The answer is 12.", 1),
    ("12", "The answer is 11.", 0),
    ("12", "The answer is: 12", 1),
    ("0.5", "The answer is 1/2.", 1),
    ("9", "The final answer is 9", 1),
    ("9", "the answer is 9.", 1),
    ("100", "The answer is $100$.", 1),
    ("100", "The answer is 10^2.", 1),
    ("4", "The answer is 2+2.", 1),
    ("5", "The answer is 2+2.", 0),
    # no stated answer / empty / echo of the question
    ("12", "", 0),
    ("12", "   ", 0),
    ("12", "What is 7 + 8 - 3? I am not sure.", 0),
    ("12", "12", 0),
    ("12", r"\boxed{}", 0),
    ("12", "The answer is", 0),
    ("42", "What is 6 times 7 which equals 42?", 0),
    # several conflicting final answers (hedging)
    ("12", "The answer is 12. Actually, the answer is 13.", 0),
    ("12", r"\boxed{12} or maybe \boxed{13}", 0),
    ("12", "#### 12\n#### 11", 0),
    ("12", r"\boxed{12} and to be sure, \boxed{12}", 1),
    ("12", "The answer is 12. So the answer is 12.", 1),
    # the answer hidden in a long list of candidates
    ("42", r"\boxed{1, 2, 3, 4, 5, 42}", 0),
    ("42", "The answer is 40, 41, 42, 43 or 44.", 0),
    ("42", r"\boxed{\{1,2,3,4,42\}}", 0),
    ("(1, 2)", r"\boxed{(1, 2)}", 1),
    # boxed beats loose text; nested braces
    ("3", r"I first thought 5, but \boxed{3}", 1),
    ("\\frac{1}{3}", r"\boxed{\frac{1}{\left(3\right)}}", 1),
]


@pytest.fixture(scope="module")
def verifier():
    return MathVerifier()


def test_table_is_large_enough():
    assert len(TABLE) >= 60


@pytest.mark.parametrize("gold,response,expected", TABLE)
def test_equivalence_table(verifier, gold, response, expected):
    fb = verifier.verify(Task(id="t", prompt="q", reference=gold), response)
    assert fb.score == expected, fb.text
    assert fb.text


def test_last_number_fallback_is_off_by_default():
    t = Task(id="t", prompt="q", reference="12")
    assert MathVerifier().verify(t, "so we get 12").score == 0.0
    assert MathVerifier(last_number_fallback=True).verify(t, "so we get 12").score == 1.0


def test_extraction_helpers():
    assert boxed(r"\boxed{\frac{a}{b}}") == [r"\frac{a}{b}"]
    assert extract_final_answers("no answer here") == ("none", [])


def test_refuses_threads():
    import threading

    errors = []
    th = threading.Thread(
        target=lambda: errors.append(
            pytest.raises(RuntimeError, MathVerifier().verify, Task(id="t", prompt="q", reference="1"), "#### 1")
        )
    )
    th.start()
    th.join()
    assert errors
