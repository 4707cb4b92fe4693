"""`key=value` settings given on a command line, as used by `hf-clinic --set/--threshold` and the recipes' `--clip_args`.

Values are read as JSON where they parse (`2.5`, `10`, `true`, `null`, `[1, 2]`) and kept as strings otherwise, so
`name=x` needs no quotes. A malformed item, an empty key or a key given twice is an error that names it: a repeated
key would otherwise silently drop one of the values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable


__all__ = ["parse_key_values"]


def parse_key_values(items: str | Iterable[str] | None, *, option: str) -> dict:
    """Parse `key=value` settings into a dict.

    Args:
        items (`str` or iterable of `str`, *optional*): either one comma-separated string (`"a=1,b=x"`, as
            `--clip_args` takes it) or the items of a repeatable option (`["a=1", "b=x"]`, as `--set` takes it).
            `None` or `""` gives `{}`.
        option (`str`): the option the settings came from, named in error messages (e.g. `"--clip_args"`).

    Returns:
        `dict`: key -> value, in the order given; values parsed as JSON where possible.

    Raises:
        `ValueError`: an item without `=`, an empty key, or a key given twice.

    Example:

    ```python
    >>> parse_key_values("z_thresh=2.5,warmup_steps=10,name=x", option="--clip_args")
    {'z_thresh': 2.5, 'warmup_steps': 10, 'name': 'x'}
    ```
    """
    if isinstance(items, str):
        items = items.split(",")
    settings = {}
    for item in items or ():
        if not item.strip():
            continue  # "a=1," or an empty --set
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"Invalid {option} setting {item!r}; expected key=value")
        if not key:
            raise ValueError(f"Invalid {option} setting {item!r}; the key is empty")
        if key in settings:
            raise ValueError(f"{option}: {key!r} is given twice")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings
