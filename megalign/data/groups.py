"""Preference groups inside a pack: a prompt followed by its responses, one sample each, never split across packs.

`Pack.roles[i]` says what sample i is: PROMPT (the conversation up to the answer, no loss), CHOSEN, or
REJECTED + j for the j-th rejected answer (j = 0 .. M-1). A response's loss mask is 1 on its tokens (each is a
target: the first one is predicted from the prompt's last token). Every group starts with its prompt.
"""

from __future__ import annotations

import numpy as np

PROMPT, CHOSEN, REJECTED = 0, 1, 2


def group_starts(roles: np.ndarray) -> np.ndarray:
    """The sample index of each group's prompt."""
    return np.flatnonzero(np.asarray(roles) == PROMPT)


def check_roles(roles: np.ndarray) -> None:
    """Every group is PROMPT, CHOSEN, REJECTED, REJECTED + 1, ...; ValueError naming the first bad sample."""
    roles = np.asarray(roles)
    expected = None
    for i, role in enumerate(roles.tolist()):
        if role == PROMPT:
            if expected is not None and expected <= REJECTED:
                raise ValueError(f"sample {i}: a prompt, but the group before it has no chosen and rejected answer")
            expected = CHOSEN
        elif expected is None or role != expected:
            raise ValueError(f"sample {i}: role {role}, expected {expected if expected is not None else PROMPT}")
        else:
            expected = role + 1
    if expected is not None and expected <= REJECTED:
        raise ValueError("the last group has no chosen and rejected answer")
