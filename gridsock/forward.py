"""(being written this session)"""


def add_commands(sub) -> None:
    """Add this module's commands to the ``gridsock`` parser (none yet)."""
