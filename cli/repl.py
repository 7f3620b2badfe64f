"""Reading chat input: line editing and a persistent history on a terminal (Python's `readline`, as `input()` in
mlx_lm.chat gets it), plain lines from a pipe.

The history lives in `$MLX_INTERNVL_CACHE/chat_history` (default `~/.cache/mlx-internvl/chat_history`), the last
`HISTORY_LENGTH` lines, written when the chat ends. Up/down arrows recall earlier questions and commands (also from
earlier sessions); Ctrl-R searches them; the usual Emacs keys edit the line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from mlx_internvl.hub import cache_root

try:  # line editing for input(); absent from some Python builds, where input() still works without it
    import readline
except ImportError:
    readline = None

HISTORY_LENGTH = 1000


def history_path() -> Path:
    return cache_root() / "chat_history"


class LineReader:
    """`reader.read(">> ")` -> the next line without its newline, or None at end of input."""

    def __init__(self, interactive: Optional[bool] = None, history: Optional[Path] = None):
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self.readline = None
        self.history = history or history_path()
        if self.interactive:
            self.readline = readline
        if self.readline is not None:
            self.readline.set_history_length(HISTORY_LENGTH)
            if self.history.exists():
                try:
                    self.readline.read_history_file(str(self.history))
                except OSError:
                    pass  # an unreadable history is not worth stopping a chat for

    def read(self, prompt: str = ">> ") -> Optional[str]:
        if not self.interactive:
            line = sys.stdin.readline()
            return line.rstrip("\n") if line else None
        try:
            return input(prompt)
        except EOFError:
            sys.stderr.write("\n")
            return None

    def close(self) -> None:
        if self.readline is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.history))
        except OSError as e:
            sys.stderr.write(f"(chat history not saved: {e})\n")
