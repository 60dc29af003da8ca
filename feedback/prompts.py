"""Every prompt template selfevolve sends to a model, in one file so they can be read,
compared with the papers, and overridden from config.
"""

# SCoRe (arXiv 2409.12917), the second-turn instruction, verbatim. Also the default revision
# prompt of the loop when no critic is configured (intrinsic self-correction).
SCORE_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution."
)

# How a critic's text is turned into the next user message: the critique, then the request.
REVISE_WITH_CRITIQUE = "{critique}\n\nPlease correct the error, if any, and rewrite the solution."

# STaR (arXiv 2203.14465) rationalisation: the correct answer is given as a hint after the
# question. The hint is never part of a training example (`recipes/star.py`).
STAR_HINT = "{prompt} (Hint: the answer is {answer}.)"

# SELF / Self-Refine: the policy (SelfCritic) or another model (JudgeCritic) reviews the
# latest answer. `{notes}` carries earlier critiques (Reflexion-style memory). The verdict is
# read from the critique by critics.parse_verdict: an unqualified sentence stating NO_ERRORS, or
# a last line "Verdict: correct", means "nothing to fix" (stop); anything else asks to revise.
NO_ERRORS = "no errors"
CRITIQUE = (
    "Check this answer. If it is right, reply \"The answer has no errors.\" Otherwise say what is wrong.\n"
    "Question: {question}\nAnswer: {answer}{notes}"
)

# Reflexion-style memory: critiques of earlier attempts, most recent last.
NOTES = "\n\nNotes on earlier attempts:\n{notes}"

# VerifierCritic: a verifier's result in words the model can act on.
VERIFIER_WRONG = "Your answer is wrong: {why}."
VERIFIER_EXPECTED = " The expected answer is {reference}."
VERIFIER_RIGHT = "The answer has no errors."
