"""Command line: argparse subcommands that parse, call one API function and print; no physics here."""
