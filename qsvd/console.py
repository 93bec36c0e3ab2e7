"""The one stderr console for qsvd's messages and progress bars."""

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # soft wrap: never break a path across lines
