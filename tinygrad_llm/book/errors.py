"""The book's one error type."""


class BookError(RuntimeError):
    """A broken book: a missing page or figure, a dangling link, a listing that raises, a failed tool."""
