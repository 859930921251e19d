"""`python -m epd.plan.profile ...`: the same as `epd profile ...` (epd.plan.profile.cli), for
machines where the `epd` script is not on the path."""

from __future__ import annotations

import argparse
import sys

from epd.plan.profile import cli


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (as `epd`'s own help does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epd.plan.profile",
        description=cli.__doc__.splitlines()[0],
        formatter_class=_HelpFormatter,
    )
    cli.add_profile_options(parser)
    parser.set_defaults(parser=parser)
    return cli.run_profile(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
