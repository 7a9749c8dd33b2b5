"""``bittern chat``: an interactive conversation on a text stream, with the history kept between turns."""

from __future__ import annotations

from typing import Any, TextIO

from bittern.engine.engine import Engine

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


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
    line is skipped; ``/reset`` forgets the history; ``/exit``, ``/quit`` or the end of ``stdin`` ends.

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
        messages.append({"role": "user", "content": user})
        if transcript:
            write(("\n" if exchanges else "") + f"> {user}\n")
        exchanges += 1
        result = engine.chat(messages, max_new_tokens, stream=lambda _row, text: write(text), **options)
        write("\n")
        messages.append({"role": "assistant", "content": result.text})
    return messages
