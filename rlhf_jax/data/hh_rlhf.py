"""Anthropic HH-RLHF dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages, for the
comparison, demonstration and prompt readers alike."""

from __future__ import annotations

import re

from rlhf_jax.data.chat import DefectiveRecord
from rlhf_jax.errors import DataError

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_hh_dialogue(dialogue: str, where: str = "", name: str = "dialogue") -> tuple[str, str]:
    """(history, response): the text before the final "\\n\\nAssistant:" and after it, the
    response without its one leading space."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{where}: {name!r} has no {HH_ASSISTANT!r} turn; an HH-RLHF dialogue is "
            f"'\\n\\nHuman: ...\\n\\nAssistant: ...'. Check the format (ranked, pairwise, hh_rlhf)."
        )
    response = dialogue[cut + len(HH_ASSISTANT) :]
    return dialogue[:cut], response[1:] if response.startswith(" ") else response


def hh_messages(history: str, where: str = "") -> list[dict[str, str]]:
    """Chat messages of an HH-RLHF history "\\n\\nHuman: a\\n\\nAssistant: b..." (one leading
    space of each turn dropped); it must start with a Human turn and end with one."""
    parts = _HH_TURN.split(history)  # ["", role, text, role, text, ...]
    if parts[0] or len(parts) < 3:
        raise DataError(
            f"{where}: the dialogue does not start with '\\n\\nHuman:' (starts {history[:40]!r}); "
            f"use HH-RLHF dialogues or another format."
        )
    messages = [
        {"role": _HH_ROLES[role], "content": text[1:] if text.startswith(" ") else text}
        for role, text in zip(parts[1::2], parts[2::2])
    ]
    if messages[-1]["role"] != "user":
        raise DefectiveRecord(
            f"{where}: the turn before the final {HH_ASSISTANT!r} is an Assistant turn, so there "
            f"is no Human prompt to answer — fix or remove the record (skip_invalid=True drops "
            f"such records)."
        )
    return messages
