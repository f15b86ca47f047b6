"""The errors a stage reports as one line (stages/lib/cli.py): user input that cannot be used as it is."""


class InputError(ValueError):
    """User data, a model or an argument that cannot be used: the message names the file or key, the place
    and what was expected."""


class TemplateError(InputError):
    """A chat template this project cannot use as it needs (spans, end of turn, system prompt, prompt budget)."""
