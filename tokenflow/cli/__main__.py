"""``python -m tokenflow.cli edit|invert [overrides]``: the console scripts as a module, e.g. under
``torchrun --standalone --nproc-per-node 2 -m tokenflow.cli edit ...`` (see :mod:`tokenflow.cli.main`)."""
from __future__ import annotations

import sys

from tokenflow.cli.main import edit_main, invert_main

COMMANDS = {"edit": edit_main, "invert": invert_main}


def main(argv: list[str]) -> None:
    """Run the command ``argv[1]`` with the overrides after it (as ``tokenflow-<command>`` would)."""
    command = argv[1] if len(argv) > 1 else ""
    if command not in COMMANDS:
        print(f"error: python -m tokenflow.cli needs a command, {' or '.join(COMMANDS)}, got {command or 'none'!r} "
              "— e.g. python -m tokenflow.cli edit model=tiny prompt='a red fox'", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"tokenflow-{command}", *argv[2:]]
    COMMANDS[command]()


if __name__ == "__main__":
    main(sys.argv)
