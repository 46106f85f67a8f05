"""Helpers for the one-line error messages that DataError/ConfigError carry."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """Collapse a foreign error message (often multi-line) into one short line."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
