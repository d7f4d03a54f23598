"""Configuration fields that carry their command-line option.

A dataclass field built by :func:`option` holds, in its ``metadata``, the help text of the
option that sets it and, where it differs from the field's name, how the option is spelled.
The command line (``bayes_router.cli``) builds its options from these fields, so every field is
settable, its default has one home (the dataclass) and its help one wording; the library itself
never parses arguments.
"""

from __future__ import annotations

import dataclasses


def option(default, help: str, **cli):
    """A dataclass field with a default and its command-line option.

    :param help: the option's help text (without the default: the CLI shows it).
    :param cli: how the option differs from ``--<field-name>``: ``flag`` (and ``aliases``), the
        ``choices``, a ``metavar``; for a boolean field, ``flag`` with ``negate=True`` names a
        switch that sets the field to ``False``, and ``switch=True`` makes the option a switch
        that sets it to ``True`` (no ``--no-`` form); ``none_flag`` and ``none_help`` add a
        second switch that sets the field to ``None``; ``command_line=False`` leaves the field
        out of the command line (with the reason in ``help``).
    """
    return dataclasses.field(default=default, metadata={"help": help, **cli})
