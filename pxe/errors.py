"""Exception types that map to the CLI exit codes (1 = failed, 2 = bad usage/input)."""


class DynprovError(Exception):
    """An operation failed; the message is shown to the admin as is. Exit code 1."""

    exit_code = 1


class InputError(DynprovError):
    """The admin or caller gave something invalid (a MAC, a name, a missing key). Exit code 2."""

    exit_code = 2


class NotFound(DynprovError):
    """An unknown node, image or pool was named. Exit code 1."""
