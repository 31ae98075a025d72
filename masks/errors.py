"""The one exception type for anything wrong with a mask bundle or its fit to a model."""


class BundleError(ValueError):
    """A bundle file is malformed, or does not fit the model / latent it is used with.

    Messages name the file (when there is one), the field, and what the user should do.
    """

    def __init__(self, message: str, *, path=None, field=None):
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message  # without the file and field prefix
        prefix = f"{self.path}: " if self.path else ""
        where = f"[{field}] " if field else ""
        super().__init__(f"{prefix}{where}{message}")
