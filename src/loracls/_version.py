"""The version, in a leaf module (the package __init__ imports the API, which must not import it back)."""

__version__ = "0.1.0"
