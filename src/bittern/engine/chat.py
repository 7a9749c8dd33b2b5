"""``bittern chat``: an interactive conversation on a text stream, with the history kept between turns."""

from __future__ import annotations

from typing import Any, TextIO

from bittern.engine.engine import Engine

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
ECHO_PREVIEW_CHARS = 200
"""The most characters of a refused (too long) turn echoed in a transcript."""


def chat_loop(
    engine: Engine,
    stdin: TextIO,
    stdout: TextIO,
    *,
    system: str | None = None,
    prompt: str = "",
    transcript: bool = False,
    max_new_tokens: int = 256,
    **options: Any,
) -> list[dict[str, str]]:
    """Read user turns from ``stdin`` (one per line) and stream the assistant's replies to ``stdout``.

    Each reply is generated from the whole conversation so far through the tokenizer's chat template. An empty
    line is skipped; ``/reset`` forgets the history; ``/exit``, ``/quit`` or the end of ``stdin`` ends. A turn
    whose prompt (the conversation with it) leaves no room for ``max_new_tokens`` in the engine's ``max_seq_len``
    is refused with one line, is not added to the history, and the conversation goes on with the next turn.

    Args:
        system: an optional system message that opens the conversation.
        prompt: written to ``stdout`` before each turn is read (e.g. ``"> "`` on a terminal).
        transcript: for input that is not typed (a pipe): echo each user turn as ``> TEXT`` before its reply and
            put a blank line between one reply and the next turn, so the output reads as a conversation.
        max_new_tokens, options: as for :meth:`Engine.chat` (sampling, stop strings).

    Returns:
        the conversation, as chat messages.

    Raises:
        ConfigError: the tokenizer has no chat template (checked before anything is read).
    """
    engine.check_chat_template()
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    exchanges = 0

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    while True:
        write(prompt)
        line = stdin.readline()
        if not line:
            write("\n" if prompt else "")
            break
        user = line.strip()
        if not user:
            continue
        if user in EXIT_COMMANDS:
            break
        if user == RESET_COMMAND:
            messages = list(opening)
            write("(history cleared)\n")
            continue
        turn = {"role": "user", "content": user}
        ids = engine.chat_prompt([*messages, turn])
        refusal = _refusal(engine, user, len(ids), max_new_tokens, history=len(messages) > len(opening))
        if transcript:
            shown = user if refusal is None else _preview(user)
            write(("\n" if exchanges else "") + f"> {shown}\n")
        exchanges += 1
        if refusal is not None:
            write(refusal + "\n")
            continue
        messages.append(turn)
        result = engine.generate_ids([ids], max_new_tokens, stream=lambda _row, text: write(text), **options)
        write("\n")
        messages.append({"role": "assistant", "content": result.text})
    return messages


def _refusal(engine: Engine, user: str, prompt_tokens: int, max_new_tokens: int, history: bool) -> str | None:
    """The line that refuses a turn whose prompt of ``prompt_tokens`` leaves no room for ``max_new_tokens`` in the
    engine's ``max_seq_len``, or None when it fits."""
    if prompt_tokens + max_new_tokens <= engine.max_seq_len:
        return None
    turn_tokens = len(engine.tokenizer(user, add_special_tokens=False)["input_ids"])
    room = max(engine.max_seq_len - max_new_tokens, 0)
    what = "with the conversation so far, the prompt" if history else "the prompt"
    hint = "shorten the turn, or /reset the history" if history else "shorten the turn"
    return (
        f"(turn not sent: it is {turn_tokens:,} tokens and {what} would be {prompt_tokens:,}; at most {room:,} "
        f"fit (max_seq_len {engine.max_seq_len:,} minus {max_new_tokens:,} new tokens): {hint})"
    )


def _preview(text: str) -> str:
    """``text``, or its first :data:`ECHO_PREVIEW_CHARS` characters and its length when it is longer."""
    if len(text) <= ECHO_PREVIEW_CHARS:
        return text
    return f"{text[:ECHO_PREVIEW_CHARS]}… ({len(text):,} characters)"
