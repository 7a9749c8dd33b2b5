"""The tokenizer that goes with a checkpoint, and chat templates.

A checkpoint's tokenizer lives beside its weights (``tokenizer.json``, ``tokenizer_config.json``, ... in the
directory) or, for a GGUF file, inside the file (``tokenizer.ggml.*`` metadata, which transformers turns back into
a Hugging Face tokenizer: ``AutoTokenizer.from_pretrained(directory, gguf_file=name)``). :func:`load_tokenizer`
reads either; :func:`tokenizer_source` gives a directory of tokenizer files to copy beside a converted checkpoint.

Chat templates: a tokenizer trained by bittern has none. :data:`CHAT_TEMPLATES` holds the named ones
``--chat-template`` accepts (any other value is read as a Jinja file):

* ``plain`` — bittern's default for models trained on chat data: ``User: …``, ``Assistant: …`` turns, each ended
  by the tokenizer's EOS token (so generation stops at the end of the reply, and a tokenizer needs no extra
  tokens);
* ``chatml`` — ``<|im_start|>role\\n…<|im_end|>``, for tokenizers that have those two tokens (SmolLM2, Qwen).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bittern.errors import ConfigError, MissingFileError

PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}"
)
CHAT_TEMPLATES = {"plain": PLAIN_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}
"""``--chat-template`` names → Jinja templates (see the module docstring)."""
DEFAULT_CHAT_TEMPLATE = "plain"
"""The template a run trained on chat data gets when its tokenizer has none and no ``--chat-template`` is given."""
_REQUIRED_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}


def _is_gguf(path: str | Path) -> bool:
    """:func:`bittern.formats.gguf.is_gguf_file`, imported on use (it brings torch and numpy)."""
    from bittern.formats.gguf import is_gguf_file

    return is_gguf_file(path)


def _tokenizer_file_names() -> tuple[str, ...]:
    """Files that make up a Hugging Face tokenizer (any one of them means a directory has a tokenizer)."""
    from bittern.formats.common import TOKENIZER_FILES

    return tuple(name for name in TOKENIZER_FILES if name != "generation_config.json")


def tokenizer_files(directory: str | Path) -> list[str]:
    """The names of the tokenizer files in ``directory`` (empty for a file or a directory without any)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [name for name in _tokenizer_file_names() if (directory / name).is_file()]


def has_tokenizer(path: str | Path) -> bool:
    """Whether a checkpoint directory has tokenizer files, or ``path`` is a GGUF file (which carries one)."""
    return _is_gguf(path) or bool(tokenizer_files(path))


def load_tokenizer(path: str | Path, purpose: str = "bittern") -> Any:
    """The Hugging Face tokenizer of the checkpoint at ``path``: a directory's tokenizer files, or the tokenizer
    stored in a GGUF file.

    Args:
        purpose: what needs it, for the error message (``"bittern eval"``, ``"text generation"``, ...).

    Raises:
        MissingFileError: no tokenizer there, or it cannot be loaded (the message names ``path`` and ``purpose``).
        CorruptCheckpointError: a GGUF file that is truncated or corrupt (checked by bittern's GGUF reader before
            transformers reads the tokenizer from it).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    gguf = _is_gguf(path)
    if gguf:
        from bittern.formats.gguf import check_gguf_file

        check_gguf_file(path)
    else:
        if not path.exists():
            raise MissingFileError(f"{purpose} needs a tokenizer, and the checkpoint does not exist", path)
        if not tokenizer_files(path):
            raise MissingFileError(
                f"{purpose} needs the model's tokenizer, and there are no tokenizer files (tokenizer.json, "
                "tokenizer_config.json, ...) beside the weights",
                path,
            )
    try:
        if gguf:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        reason = " ".join(str(exc).split())
        where = "the tokenizer stored in the GGUF file" if gguf else "the tokenizer files"
        raise MissingFileError(f"{purpose}: cannot load {where} ({reason})", path) from exc


def chat_template_text(spec: str) -> str:
    """The Jinja text ``--chat-template`` names: one of :data:`CHAT_TEMPLATES`, or a file holding a template.

    Raises:
        ConfigError: neither a known name nor a readable, non-empty UTF-8 file (the message lists the names).
    """
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    path = Path(spec)
    names = ", ".join(CHAT_TEMPLATES)
    if not path.is_file():
        raise ConfigError(f"--chat-template {spec!r} is neither a template name ({names}) nor an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--chat-template file '{path}' cannot be read as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ConfigError(f"--chat-template file '{path}' is empty")
    return text


def check_chat_template_spec(spec: str | None) -> None:
    """Raise :class:`ConfigError` now if ``spec`` (a ``--chat-template`` value) names no template."""
    if spec is not None:
        chat_template_text(spec)


def set_chat_template(tokenizer: Any, spec: str) -> None:
    """Give ``tokenizer`` the chat template ``spec`` names (see :func:`chat_template_text`), after checking that it
    renders a conversation with this tokenizer.

    Raises:
        ConfigError: an unknown name or unreadable file, a template that does not render (a Jinja error), or a
            named template whose special tokens the tokenizer lacks (``chatml`` needs ``<|im_start|>`` and
            ``<|im_end|>``).
    """
    text = chat_template_text(spec)
    vocab = tokenizer.get_vocab()
    missing = [t for t in _REQUIRED_TOKENS.get(spec, ()) if t not in vocab]
    if missing:
        raise ConfigError(
            f"--chat-template {spec} needs the tokens {', '.join(missing)}, which this tokenizer does not have "
            f"(they would be split into pieces); use --chat-template {DEFAULT_CHAT_TEMPLATE} or a template file"
        )
    previous = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = text
    probe = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 raises many kinds (TemplateSyntaxError, UndefinedError, TypeError, ...)
        tokenizer.chat_template = previous
        reason = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"--chat-template {spec}: the template does not render ({reason})") from exc


@contextlib.contextmanager
def tokenizer_source(path: str | Path, chat_template: str | None = None) -> Iterator[Path | None]:
    """A directory of tokenizer files to copy beside a checkpoint converted from ``path``.

    The directory ``path`` itself when it has tokenizer files and no ``chat_template`` is asked for; otherwise
    (a GGUF file, whose tokenizer is inside it, or a new chat template) a temporary directory holding the
    source's files with the tokenizer saved over them by ``save_pretrained``, removed afterwards. None when
    ``path`` has no tokenizer (and no chat template is asked for).

    Raises:
        ConfigError: a ``chat_template`` for a source without a tokenizer, or a bad template (see
            :func:`set_chat_template`).
        MissingFileError: the tokenizer cannot be loaded.
    """
    path = Path(path)
    if not has_tokenizer(path):
        if chat_template is not None:
            raise ConfigError(f"--chat-template: '{path}' has no tokenizer to give a chat template to")
        yield None
        return
    if chat_template is None and not _is_gguf(path):
        yield path
        return
    tokenizer = load_tokenizer(path, "a converted checkpoint")
    if chat_template is not None:
        set_chat_template(tokenizer, chat_template)
    staging = Path(tempfile.mkdtemp(prefix="bittern-tokenizer-"))
    try:
        if path.is_dir():  # keep what save_pretrained does not write (generation_config.json, ...)
            for name in (*_tokenizer_file_names(), "generation_config.json"):
                if (path / name).is_file() and name not in ("chat_template.json", "chat_template.jinja"):
                    shutil.copy2(path / name, staging / name)
        tokenizer.save_pretrained(str(staging))
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
